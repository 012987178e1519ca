"""Fault corpus for training data ("Nothing lost, whatever the user or the machine does"): each file
here once failed a run with a traceback, trained on replaced characters, or lost a row silently. Each
is now a row error (``file:line field: problem``, the row skipped) or a `DataError` naming the line,
found before a run starts: by `load_examples` (no tokenizer), and by `prepare_dataset` for what only
the chat template or the tokenizer can see."""

import codecs
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from qlora_studio.data import DataError, check_file, load_examples, prepare_dataset, row_char_limit

GOOD = {"prompt": "naïve question", "completion": "an answer"}
CHAT_GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def _write(path, lines, encoding="utf-8"):
    """A JSONL file of rows (dicts) and raw lines (str or bytes), newline-terminated."""
    out = b""
    for r in lines:
        if isinstance(r, dict):
            r = json.dumps(r, ensure_ascii=False)
        out += (r.encode(encoding) if isinstance(r, str) else r) + b"\n"
    path.write_bytes(out)
    return path


def _errors(report):
    return [(i.line, i.field) for i in report.errors]


@pytest.fixture(scope="module")
def tokenizer(embedded_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_path)


def cli(*args, home, timeout=300):
    env = dict(os.environ, QLORA_STUDIO_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "qlora_studio.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------- 3: rows that only failed inside the template


def test_a_conversation_that_starts_with_the_assistant_is_a_row_error(tmp_path):
    sys_then_assistant = {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"},
                                       {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assistant_first = {"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"},
                                         {"from": "gpt", "value": "a"}]}
    _, report = load_examples(_write(tmp_path / "d.jsonl", [CHAT_GOOD, sys_then_assistant, CHAT_GOOD]))
    assert _errors(report) == [(2, "messages[1].role")] and report.usable == 2
    assert "must start with a user message" in report.errors[0].message
    _, report = load_examples(_write(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, assistant_first]))
    assert _errors(report) == [(2, "conversations[0].from")]


def test_an_unpaired_surrogate_is_a_row_error_naming_the_field_and_character(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        GOOD,
        '{"prompt": "ab\\ud800c", "completion": "x"}',
        '{"prompt": "emoji \\ud83d\\ude00 is fine", "completion": "x"}',  # a pair is one character
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\udc00"}]}',
    ])
    examples, report = load_examples(path, fmt="prompt_completion")
    assert _errors(report)[0] == (2, "prompt")
    assert "unpaired surrogate \\ud800 at character 3" in report.errors[0].message
    assert [e.line for e in examples] == [1, 3] and examples[1].messages[0]["content"] == "emoji \U0001F600 is fine"
    _, report = load_examples(_write(tmp_path / "c.jsonl", [CHAT_GOOD, path.read_text().splitlines()[3]]))
    assert _errors(report) == [(2, "messages[1].content")] and "character 1" in report.errors[0].message
    _, report = load_examples(_write(tmp_path / "a.jsonl", [
        {"instruction": "q", "output": "a"}, '{"instruction": "q", "input": "x\\udfffy", "output": "a"}']))
    assert _errors(report) == [(2, "input")]


def test_rows_that_failed_the_tokenizer_are_skipped_and_reported_by_prepare_dataset(tmp_path, tokenizer):
    """Both used to raise from the chat template or the tokenizer (no file, no line) and fail the run."""
    path = _write(tmp_path / "d.jsonl", [
        CHAT_GOOD,
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
        '{"messages": [{"role": "user", "content": "q\\ud800"}, {"role": "assistant", "content": "a"}]}',
        CHAT_GOOD,
    ])
    data = prepare_dataset(path, tokenizer, 64, eval_fraction=0)
    assert len(data.train) == 2 and data.report.usable == 2
    assert _errors(data.report) == [(2, "messages[0].role"), (3, "messages[0].content")]
    assert data.report.warnings[0] == "2 of 4 rows skipped (see errors)"


def test_a_row_the_chat_template_rejects_is_skipped_not_fatal(tmp_path, embedded_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_path)
    tok.chat_template = ("{% for m in messages %}{% if m['content'] == 'BOOM' %}{{ raise_exception('no BOOM here') }}"
                         "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    boom = {"messages": [{"role": "user", "content": "BOOM"}, {"role": "assistant", "content": "a"}]}
    path = _write(tmp_path / "d.jsonl", [CHAT_GOOD, boom, CHAT_GOOD])
    data = prepare_dataset(path, tok, 64, eval_fraction=0)
    assert len(data.train) == 2 and _errors(data.report) == [(2, "messages")]
    assert "chat template or the tokenizer failed" in data.report.errors[0].message
    assert "no BOOM here" in data.report.errors[0].message
    assert check_file(path, tok, 64).usable == 2
    with pytest.raises(DataError, match=r"all\.jsonl:1 messages: the chat template .* no usable rows"):
        prepare_dataset(_write(tmp_path / "all.jsonl", [boom, boom]), tok, 64)


def test_the_data_tab_reports_a_row_the_chat_template_rejects(tmp_path, embedded_path):
    """The Data tab tokenizes as training does: the row is listed as skipped, the page still renders."""
    import shutil

    from transformers import AutoTokenizer

    from qlora_studio.ui.data import check

    model = tmp_path / "strict-template"
    shutil.copytree(embedded_path, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = ("{% for m in messages %}{% if m['content'] == 'BOOM' %}{{ raise_exception('no BOOM here') }}"
                         "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok.save_pretrained(model)
    boom = {"messages": [{"role": "user", "content": "BOOM"}, {"role": "assistant", "content": "a"}]}
    path = _write(tmp_path / "d.jsonl", [boom, CHAT_GOOD, CHAT_GOOD])
    summary, errors, *_ = check(str(path), str(model), 512, None)
    assert "<b>2</b> usable of 3 rows" in summary
    assert "1 rows skipped" in errors and "d.jsonl:1 messages: the chat template or the tokenizer failed" in errors
    assert "no BOOM here" in errors


# ---------------------------------------------------------------- 6: encodings


def test_a_line_that_is_not_utf8_is_a_row_error_and_nothing_is_replaced(tmp_path):
    path = _write(tmp_path / "d.jsonl", [GOOD, '{"prompt": "café", "completion": "crème"}'.encode("latin-1"), GOOD])
    examples, report = load_examples(path)
    assert [e.line for e in examples] == [1, 3]
    assert report.errors[0].format("d.jsonl") == (
        "d.jsonl:2 (encoding): not UTF-8 (byte 0xE9 at column 16); save the file as UTF-8")
    assert report.rows == 3 and not any("\ufffd" in m["content"] for e in examples for m in e.messages)
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes("prompt,completion\nnaïve,a\n".encode() + "café,b\nq,\"multi\nline\"\n".encode("latin-1"))
    examples, report = load_examples(csv_path)
    assert [e.messages[0]["content"] for e in examples] == ["naïve", "q"] and _errors(report) == [(3, "(encoding)")]


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_a_file_in_another_encoding_is_refused_naming_the_first_bad_line(tmp_path, suffix):
    rows = [{"prompt": f"question {i}", "completion": "réponse" if i else "plain"} for i in range(6)]
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        _write(path, [json.dumps(r, ensure_ascii=False).encode("cp1252") for r in rows])
    else:
        path.write_bytes(("prompt,completion\r\n" + "".join(f"{r['prompt']},{r['completion']}\r\n" for r in rows))
                         .encode("cp1252"))
    line, lines = (2, 6) if suffix == "jsonl" else (3, 7)
    with pytest.raises(DataError, match=rf"d\.{suffix}:{line} \(encoding\): the file is not UTF-8: 5 of its {lines} lines "
                                        r".*byte 0xE9 at column \d+.*save the file as UTF-8"):
        load_examples(path)


def test_a_json_file_with_a_byte_that_is_not_utf8_is_refused_with_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"prompt": "q", "completion": "a"},\n{"prompt": "caf\xe9", "completion": "a"}\n]')
    with pytest.raises(DataError, match=r"d\.json:3 \(encoding\): not UTF-8 \(byte 0xE9 at column 16\)"):
        load_examples(path)


def test_a_utf8_bom_keeps_row_one_and_excel_csv_utf8_is_read(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + "".join(json.dumps(GOOD) + "\n" for _ in range(3)).encode())
    examples, report = load_examples(path)
    assert report.usable == 3 and not report.errors and examples[0].line == 1
    excel = tmp_path / "excel.csv"  # Excel's "CSV UTF-8": a BOM, CRLF, a quoted field with a line break
    excel.write_bytes(codecs.BOM_UTF8 + 'prompt,completion\r\nnaïve,"two\r\nlines"\r\nq2,a2\r\n'.encode())
    examples, report = load_examples(excel)
    assert (report.format, report.usable, report.errors) == ("prompt_completion", 2, [])
    assert examples[0].messages == [{"role": "user", "content": "naïve"}, {"role": "assistant", "content": "two\r\nlines"}]
    assert report.sha256 == hashlib.sha256(excel.read_bytes()).hexdigest()


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le"])
@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv"])
def test_utf16_and_utf32_files_with_a_bom_are_decoded(tmp_path, codec, suffix):
    rows = [{"prompt": f"café {i} 😀", "completion": f"crème {i}"} for i in range(3)]
    text = {"jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows),
            "json": json.dumps(rows, ensure_ascii=False, indent=1),
            "csv": "prompt,completion\r\n" + "".join(f"{r['prompt']},{r['completion']}\r\n" for r in rows)}[suffix]
    bom = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE, "utf-32-le": codecs.BOM_UTF32_LE}[codec]
    path = tmp_path / f"d.{suffix}"
    path.write_bytes(bom + text.encode(codec))
    examples, report = load_examples(path)
    assert (report.usable, report.errors) == (3, [])
    assert [e.messages[1]["content"] for e in examples] == ["crème 0", "crème 1", "crème 2"]
    assert examples[2].messages[0]["content"] == "café 2 😀"
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_utf16_without_a_bom_is_named_not_reported_as_bad_json(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode("utf-16-le") * 3)
    with pytest.raises(DataError, match=r"d\.jsonl:1 \(encoding\): .*UTF-16 or UTF-32 without a byte-order mark"):
        load_examples(path)


# ---------------------------------------------------------------- 7 and 9: tracebacks, duplicates, huge rows


def test_deeply_nested_json_is_a_row_error_in_jsonl_and_refuses_a_json_file(tmp_path):
    path = _write(tmp_path / "d.jsonl", [GOOD, "[" * 100_000, '{"prompt": "q", "completion": ' + "[" * 5000 + "]" * 5000 + "}"])
    _, report = load_examples(path)
    assert [(i.line, i.field, i.message.split(" (")[0]) for i in report.errors] == [
        (2, "(json)", "nested too deeply"), (3, "(json)", "nested too deeply")]
    assert report.usable == 1 and report.rows == 3
    (tmp_path / "d.json").write_text("[" * 100_000)
    with pytest.raises(DataError, match=r"d\.json:1 \(json\): nested too deeply"):
        load_examples(tmp_path / "d.json")


def test_duplicate_keys_are_row_errors_and_refuse_a_json_files_top_level(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        GOOD,
        '{"prompt": "q", "completion": "first", "completion": "second"}',
        '{"messages": [{"role": "user", "content": "q", "content": "r"}, {"role": "assistant", "content": "a"}]}',
    ])
    examples, report = load_examples(path)
    assert len(examples) == 1 and _errors(report) == [(2, "completion"), (3, "content")]
    assert report.errors[0].format("d.jsonl") == 'd.jsonl:2 completion: duplicate key "completion"; give each key once'
    rows = '[{"prompt": "q", "completion": "a"}, {"prompt": "q", "prompt": "p", "completion": "a"}]'
    (tmp_path / "rows.json").write_text(rows)
    _, report = load_examples(tmp_path / "rows.json")
    assert _errors(report) == [(2, "prompt")] and report.usable == 1
    (tmp_path / "top.json").write_text('{"data": ' + rows + ', "data": []}')
    with pytest.raises(DataError, match=r'top\.json:1 data: duplicate key "data"'):
        load_examples(tmp_path / "top.json")
    (tmp_path / "d.csv").write_text("prompt,completion,prompt\nq,a,p\n")
    with pytest.raises(DataError, match=r'd\.csv:1 \(header\): column "prompt" appears twice'):
        load_examples(tmp_path / "d.csv")


def test_a_20mb_row_is_refused_in_seconds_in_csv_and_jsonl(tmp_path, tokenizer):
    """A 20 MB CSV field raised `_csv.Error: field larger than field limit`; a 20 MB JSONL row took
    minutes and GBs to tokenize. Now: a row error naming the line, the size and the limit."""
    big = "word " * 4_000_000
    csv_path = tmp_path / "d.csv"
    csv_path.write_text(f'prompt,completion\nq,a\nq,"{big}"\nq2,b\n')
    jsonl = _write(tmp_path / "d.jsonl", [GOOD, {"prompt": "q", "completion": big}, GOOD])
    start = time.perf_counter()
    _, report = load_examples(csv_path)
    assert report.errors[0].format("d.csv") == (
        "d.csv:3 completion: the row holds 20,000,001 characters, over the limit of 200,000; split it into shorter rows")
    assert report.usable == 2
    data = prepare_dataset(jsonl, tokenizer, 512, eval_fraction=0)
    elapsed = time.perf_counter() - start
    assert _errors(data.report) == [(2, "completion")] and len(data.train) == 2
    assert "20,000,001 characters, over the limit of 200,000" in data.report.errors[0].message
    assert elapsed < 10, f"{elapsed:.1f} s"
    # the limit follows the sequence length: 16 characters a token
    assert "over the limit of 1,048,576" in load_examples(jsonl, max_row_chars=row_char_limit(65536))[1].errors[0].message


# ---------------------------------------------------------------- the command line


def test_data_check_prints_each_row_error_without_a_traceback(tmp_path, studio_home):
    path = _write(tmp_path / "d.jsonl", [
        CHAT_GOOD,
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
        '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}',
        '{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "a"}]}'.encode("latin-1"),
        "[" * 100_000,
        '{"messages": [], "messages": []}',
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 300_000}]},
        CHAT_GOOD,
    ])
    out = cli("data", "check", str(path), home=studio_home)
    assert out.returncode == 0 and "Traceback" not in out.stderr + out.stdout, out.stderr
    for where in ("d.jsonl:2 messages[0].role: ", "d.jsonl:3 messages[0].content: unpaired surrogate",
                  "d.jsonl:4 (encoding): not UTF-8 (byte 0xE9", "d.jsonl:5 (json): nested too deeply",
                  'd.jsonl:6 messages: duplicate key "messages"', "d.jsonl:7 messages: the row holds 300,"):
        assert where in out.stdout, (where, out.stdout)
    assert "2 usable of 8 rows" in out.stdout
    report = json.loads(cli("data", "check", str(path), "--json", "--model", "embedded", home=studio_home).stdout)
    assert (report["usable"], report["rows"], report["truncated"]) == (True, 8, 0)
    assert [e["line"] for e in report["errors"]] == [2, 3, 4, 5, 6, 7] and set(report["errors"][0]) == {"line", "field", "message"}
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("prompt,completion\ncafé,crème\nété,hiver\n".encode("latin-1"))
    out = cli("data", "check", str(latin1), home=studio_home)
    assert out.returncode == 2 and "latin1.csv:2 (encoding): the file is not UTF-8" in out.stderr
    assert "Traceback" not in out.stderr


def test_train_with_no_usable_row_exits_2_naming_the_line_and_leaves_no_run_folder(tmp_path, studio_home):
    path = _write(tmp_path / "bad.jsonl", [
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
        '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}',
    ])
    out = cli("train", "--data", str(path), "--max-steps", "1", home=studio_home)
    assert out.returncode == 2, out.stderr + out.stdout
    assert f"error: {path}:1 messages[0].role: the conversation starts with an assistant message" in out.stderr
    assert "no usable rows" in out.stderr and "Traceback" not in out.stderr + out.stdout
    runs = studio_home / "runs"
    assert not runs.is_dir() or not list(runs.iterdir())
