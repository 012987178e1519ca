import csv
import json

import pytest

from qlora_studio.data import DataError, Example, assistant_spans, check_file, load_examples, prepare_dataset, tokenize_example
from qlora_studio.run_checks import data_findings


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("row, fmt", [
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "chat"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
    ({"instruction": "q", "input": "ctx", "output": "a"}, "alpaca"),
    ({"prompt": "q", "completion": "a"}, "prompt_completion"),
    ({"text": "hello world"}, "text"),
])
def test_detects_each_shape(tmp_path, row, fmt):
    examples, report = load_examples(_jsonl(tmp_path / "d.jsonl", [row] * 3))
    assert report.format == fmt and report.usable == 3
    if fmt == "text":
        assert examples[0].text == "hello world"
    else:
        assert examples[0].messages[-1] == {"role": "assistant", "content": "a"}
    if fmt == "alpaca":
        assert examples[0].messages[0]["content"] == "q\n\nctx"


def test_json_csv_parquet(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["instruction", "output"])
        w.writeheader()
        w.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.csv", "d.parquet"):
        examples, report = load_examples(tmp_path / name)
        assert (report.format, report.usable) == ("alpaca", 5), name
        assert examples[4].messages[1]["content"] == "a4"


def test_bad_rows_are_reported_with_line_and_field_and_the_rest_is_used(tmp_path):
    good = {"prompt": "q", "completion": "a"}
    path = _jsonl(tmp_path / "d.jsonl", [good, good, '{"prompt": "q", "completion": ', {"prompt": "q", "completion": ""},
                                         {"prompt": 3, "completion": "a"}, good])
    examples, report = load_examples(path)
    assert report.usable == 3 and report.rows == 6
    found = {(i.line, i.field) for i in report.errors}
    assert found == {(3, "(json)"), (4, "completion"), (5, "prompt")}
    assert "d.jsonl:4 completion: empty" in report.errors[1].format(str(path))


def test_chat_row_errors_name_the_message_field(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}]},
    ])
    _, report = load_examples(path)
    assert [(i.line, i.field) for i in report.errors] == [(2, "messages[1].role"), (3, "messages")]


def test_unusable_files_raise_with_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"d.json:2 \(json\): not valid JSON"):
        (tmp_path / "d.json").write_text('[\n{"text": }]')
        load_examples(tmp_path / "d.json")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_examples(_jsonl(tmp_path / "e.jsonl", [{"question": "q", "answer": "a"}]))
    with pytest.raises(DataError, match="no usable rows"):
        load_examples(_jsonl(tmp_path / "f.jsonl", [{"text": ""}, {"text": 5}]))
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "g.txt").write_text("hi")
        load_examples(tmp_path / "g.txt")
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl")


def test_loss_mask_covers_exactly_the_assistant_turns(embedded_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_path)
    msgs = [{"role": "system", "content": "Write SQL."}, {"role": "user", "content": "How many customers?"},
            {"role": "assistant", "content": "SELECT COUNT(*) FROM customers;"},
            {"role": "user", "content": "And orders?"}, {"role": "assistant", "content": "SELECT COUNT(*) FROM orders;"}]
    r = tokenize_example(tok, Example(1, messages=msgs), 512)
    trained = tok.decode([t for t, l in zip(r["input_ids"], r["labels"]) if l != -100])
    assert trained == "SELECT COUNT(*) FROM customers;<|im_end|>\nSELECT COUNT(*) FROM orders;<|im_end|>\n"
    masked = tok.decode([t for t, l in zip(r["input_ids"], r["labels"]) if l == -100])
    assert "How many customers?" in masked and "SELECT" not in masked
    text, spans = assistant_spans(tok, msgs)
    assert len(spans) == 2 and text[spans[0][0]:].startswith("SELECT COUNT(*) FROM customers;")


def test_truncation_is_counted_and_answerless_examples_dropped(embedded_path, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_path)
    long_answer = " ".join(["word"] * 200)
    path = _jsonl(tmp_path / "d.jsonl", [
        {"prompt": "short", "completion": "ok"},
        {"prompt": "short", "completion": long_answer},  # cut, but keeps some answer tokens
        {"prompt": " ".join(["long"] * 200), "completion": "lost"},  # answer cut off entirely
    ])
    data = prepare_dataset(path, tok, max_seq_len=64, eval_fraction=0)
    assert data.report.truncated == 2
    assert len(data.train) == 2
    assert max(len(x) for x in data.train["input_ids"]) == 64
    assert data.report.answer_cut_off == [3]
    assert any("dropped (line 3)" in w for w in data.report.warnings)
    report = check_file(path, tok, 64)
    assert report.truncated == 2
    [finding] = [f for f in data_findings(report.to_dict(), {"max_seq_len": 64})  # what the log and the page say
                 if "truncated" in f.details]
    assert finding.message.startswith("2 of 3 examples are longer than 64 tokens and were cut")
    assert finding.message.endswith("1 of them lost their whole answer and were left out of training (line 3).")
    assert finding.details["answer_cut_off"] == [3]


def test_the_system_prompt_setting_sets_or_clears_the_templates_default(embedded_path, tmp_path):
    """Alpaca rows have no system message, so SmolLM2's template adds its own ("You are a helpful AI
    assistant named SmolLM, ..."): shown by `default_system_prompt`; ``system_prompt`` replaces it
    or, with "none", keeps it out; a row with its own system message keeps it."""
    from qlora_studio.data import NO_SYSTEM, default_system_prompt
    from qlora_studio.loading import load_tokenizer

    tok = load_tokenizer(embedded_path)
    default = default_system_prompt(tok)
    assert default and "SmolLM" in default
    path = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": f"Say {w}", "output": w} for w in ("one", "two", "three", "four")]
    rows[0]["system"] = "Answer in one word."
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def texts(system):
        data = prepare_dataset(path, tok, 128, eval_fraction=0, system=system)
        return [tok.decode(ids) for ids in data.train["input_ids"]]

    as_is, replaced, cleared = texts(None), texts("You are terse."), texts(NO_SYSTEM)
    assert all(default in t for t in as_is[1:]) and "Answer in one word." in as_is[0]
    assert all("You are terse." in t and default not in t for t in replaced[1:])
    assert all(default not in t and "<|im_start|>system\n<|im_end|>" in t for t in cleared[1:])
    assert "Answer in one word." in replaced[0] and "Answer in one word." in cleared[0]
    examples, _ = load_examples(path, system="You are terse.")
    assert [m["role"] for m in examples[1].messages] == ["system", "user", "assistant"]
