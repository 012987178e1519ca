"""Training data: load a file, detect its shape, validate each row, render and mask it.

Shapes detected automatically (by the keys most rows carry):
- ``chat``:   {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
- ``sharegpt``: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
- ``alpaca``: {"instruction": ..., "input": ... (optional), "output": ...}
- ``prompt_completion``: {"prompt": ..., "completion": ...}
- ``text``:   {"text": ...} (trained on every token)

Files: .jsonl, .json (a list of rows, or an object holding one), .csv, .parquet, read by `datafile`
(encodings, duplicate keys, nesting: see there). Every row keeps the line (or row) number it came
from, so problems are reported as ``file:line field: message``. A file with a few bad rows is still
usable: it trains on the good rows and reports the rest; only a file with no usable row is refused.

A row is checked the way training will use it: its text must be text (no unpaired surrogate from a
broken ``\\ud800`` escape), a conversation must start with a user turn (after an optional system
message) and hold an assistant turn. A row longer than `row_char_limit` characters (MAX_ROW_CHARS,
or 16 per token of the sequence length when that is more: the rest would be cut off anyway) is an
error and skipped, whatever its shape ("split it"): tokenizing one 20 MB row took minutes and GBs.
With a tokenizer (`prepare_dataset`), a row that the chat template or the tokenizer rejects is
skipped and reported the same way, so one row never fails a run.

Loss is computed on assistant tokens only: the conversation is rendered with the model's chat
template, and each assistant turn's character span is found by rendering the conversation up to that
turn; tokens whose characters fall outside those spans get the label -100.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .datafile import DataError, DataIssue, file_sha256, read_rows

__all__ = ["DataError", "DataIssue", "DataReport", "Example", "PreparedData", "check_file", "detect_format",
           "file_sha256", "load_examples", "prepare_dataset", "row_char_limit", "tokenize_example"]

FORMATS = ("chat", "sharegpt", "alpaca", "prompt_completion", "text")
IGNORE_INDEX = -100
# A plain ChatML template for models that ship none (base models).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MAX_ROW_CHARS = 200_000  # characters of text in one row (see `row_char_limit`)
_SURROGATE = re.compile("[\ud800-\udfff]")
_ROW_FIELD = {"chat": "messages", "sharegpt": "conversations", "text": "text"}  # else "(row)"
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system", "bot": "assistant"}


@dataclass
class Example:
    line: int
    messages: list[dict] | None = None  # chat shape (all formats but text)
    text: str | None = None  # text shape


@dataclass
class DataReport:
    path: str
    format: str
    rows: int  # rows in the file
    usable: int  # rows that passed validation
    errors: list[DataIssue] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    truncated: int | None = None  # filled by tokenization
    answer_cut_off: list[int] = field(default_factory=list)  # lines of truncated examples left with no trained token
    token_lengths: list[int] = field(default_factory=list)
    sha256: str = ""
    # Counts for the quality checks (see `_quality_warnings`): duplicates, conflicting_prompts,
    # conflicting_rows, empty_answers, and "examples": the first few lines of each.
    quality: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["token_lengths"] = _length_stats(self.token_lengths)
        return d


def lines_text(lines: list[int], shown: int = 5) -> str:
    """"line 3" or "lines 3, 7, 9, ..." (the first ``shown``)."""
    more = ", ..." if len(lines) > shown else ""
    return f"line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines[:shown]))}{more}"


def _length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    s = sorted(lengths)
    return {"min": s[0], "median": statistics.median(s), "p95": s[min(len(s) - 1, int(0.95 * len(s)))], "max": s[-1]}


def row_char_limit(max_seq_len: int | None = None) -> int:
    """The most characters of text a row may hold: MAX_ROW_CHARS, or 16 per token of ``max_seq_len``
    (more than any tokenizer's characters per token: the rest would be cut off) when that is more."""
    return max(MAX_ROW_CHARS, 16 * (max_seq_len or 0))


# ------------------------------------------------------------------ rows to examples


def detect_format(rows: list[tuple[int, object]]) -> str | None:
    """The shape most rows have, by their keys."""
    votes = dict.fromkeys(FORMATS, 0)
    for _, row in rows[:200]:
        if not isinstance(row, dict):
            continue
        if "messages" in row:
            votes["chat"] += 1
        elif "conversations" in row:
            votes["sharegpt"] += 1
        elif "instruction" in row and "output" in row:
            votes["alpaca"] += 1
        elif "prompt" in row and "completion" in row:
            votes["prompt_completion"] += 1
        elif "text" in row:
            votes["text"] += 1
    best = max(votes, key=votes.get)
    return best if votes[best] else None


def _nonempty_str(row: dict, key: str, line: int, issues: list[DataIssue], label: str | None = None) -> str | None:
    value = row.get(key)
    name = label or key
    if value is None:
        issues.append(DataIssue(line, name, "missing"))
        return None
    if not isinstance(value, str):
        issues.append(DataIssue(line, name, f"expected text, got {type(value).__name__}"))
        return None
    if not value.strip():
        issues.append(DataIssue(line, name, "empty"))
        return None
    return value if _is_text(value, line, name, issues) else None


def _is_text(value: str, line: int, name: str, issues: list[DataIssue]) -> bool:
    """Whether ``value`` can be encoded: JSON's ``\\ud800`` escapes give unpaired surrogates, which
    the tokenizer rejects."""
    if not value.isascii() and (m := _SURROGATE.search(value)):
        issues.append(DataIssue(line, name, f"unpaired surrogate \\u{ord(m.group()):04x} at character {m.start() + 1} "
                                            "(half of a broken \\u escape); remove it or give the whole character"))
        return False
    return True


def _check_turns(turns: list[dict], line: int, key: str, role_key: str, issues: list[DataIssue]) -> list[dict] | None:
    if not turns:
        issues.append(DataIssue(line, key, "no messages"))
        return None
    if not any(t["role"] == "assistant" for t in turns):
        issues.append(DataIssue(line, key, "no assistant message to learn from"))
        return None
    for i, t in enumerate(turns):
        if t["role"] == "system" and i != 0:
            issues.append(DataIssue(line, f"{key}[{i}].{role_key}", "a system message may only come first"))
            return None
    first = 1 if turns[0]["role"] == "system" else 0
    if turns[first]["role"] != "user":
        issues.append(DataIssue(line, f"{key}[{first}].{role_key}", f"the conversation starts with an {turns[first]['role']} "
                                "message; it must start with a user message (after an optional system message)"))
        return None
    return turns


def _to_example(fmt: str, line: int, row: object, issues: list[DataIssue]) -> Example | None:
    if not isinstance(row, dict):
        issues.append(DataIssue(line, "(row)", f"expected an object, got {type(row).__name__}"))
        return None
    if fmt == "text":
        text = _nonempty_str(row, "text", line, issues)
        return Example(line, text=text) if text else None
    if fmt == "alpaca":
        instruction = _nonempty_str(row, "instruction", line, issues)
        output = _nonempty_str(row, "output", line, issues)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            issues.append(DataIssue(line, "input", f"expected text, got {type(extra).__name__}"))
            return None
        system = row.get("system") if isinstance(row.get("system"), str) and row["system"].strip() else None
        if not (instruction and output and _is_text(extra, line, "input", issues)
                and _is_text(system or "", line, "system", issues)):
            return None
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if system:
            msgs.insert(0, {"role": "system", "content": system})
        return Example(line, messages=msgs)
    if fmt == "prompt_completion":
        prompt = _nonempty_str(row, "prompt", line, issues)
        completion = _nonempty_str(row, "completion", line, issues)
        if not (prompt and completion):
            return None
        return Example(line, messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
    key, role_key, content_key = ("messages", "role", "content") if fmt == "chat" else ("conversations", "from", "value")
    turns_in = row.get(key)
    if not isinstance(turns_in, list):
        issues.append(DataIssue(line, key, "missing" if turns_in is None else f"expected a list, got {type(turns_in).__name__}"))
        return None
    turns = []
    for i, t in enumerate(turns_in):
        if not isinstance(t, dict):
            issues.append(DataIssue(line, f"{key}[{i}]", f"expected an object, got {type(t).__name__}"))
            return None
        role = t.get(role_key)
        role = _SHAREGPT_ROLES.get(str(role).lower()) if fmt == "sharegpt" else role
        if role not in ("system", "user", "assistant"):
            issues.append(DataIssue(line, f"{key}[{i}].{role_key}", f"unknown role {t.get(role_key)!r}"))
            return None
        content = _nonempty_str(t, content_key, line, issues, label=f"{key}[{i}].{content_key}")
        if content is None:
            return None
        turns.append({"role": role, "content": content})
    turns = _check_turns(turns, line, key, role_key, issues)
    return Example(line, messages=turns) if turns else None


def load_examples(path: str | Path, fmt: str | None = None, max_row_chars: int | None = None,
                  system: str | None = None) -> tuple[list[Example], DataReport]:
    """Read, detect and validate a data file (rows over ``max_row_chars`` characters, by default
    `row_char_limit()`, are errors). Raises `DataError` if nothing in it is usable. ``system``: the
    ``system_prompt`` setting, given to conversations without a system message (`with_system`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows, issues, sha256 = read_rows(path)
    unread = len(issues)
    if not rows:
        _count_skipped(DataReport(str(path), "", rows=unread, usable=0, errors=issues))
    fmt = fmt or detect_format(rows)
    if fmt is None:
        keys = sorted(rows[0][1].keys()) if isinstance(rows[0][1], dict) else []
        raise DataError(
            f"{path}:{rows[0][0]} (fields): cannot tell the format from the fields {keys}; expected one of "
            "messages | conversations | instruction+output | prompt+completion | text"
        )
    limit = max_row_chars or row_char_limit()
    examples = [ex for line, row in rows if (ex := _to_example(fmt, line, row, issues)) and _fits(ex, fmt, limit, issues)]
    issues.sort(key=lambda i: i.line)
    report = DataReport(str(path), fmt, rows=len(rows) + unread, usable=len(examples), errors=issues, sha256=sha256)
    _count_skipped(report)
    by_line = dict(rows)
    empty_lines = [i.line for i in issues if i.message == "empty" and _is_answer_field(fmt, by_line.get(i.line), i.field)]
    _quality_warnings(examples, report, empty_lines)
    return with_system(examples, system), report


NO_SYSTEM = "none"  # the system_prompt setting's word for "no system prompt, not even the model's default"


def with_system(examples: list[Example], system: str | None) -> list[Example]:
    """The ``system_prompt`` setting applied: None keeps the rows as they are (a conversation without a
    system message gets whatever the chat template adds, see `default_system_prompt`); a text becomes the
    system message of every conversation without one; ``NO_SYSTEM`` gives those an empty one, which
    keeps a template's default out. Rows with their own system message and text rows are unchanged."""
    if system is None:
        return examples
    content = "" if system.strip().lower() == NO_SYSTEM else system
    return [Example(ex.line, [{"role": "system", "content": content}] + ex.messages, ex.text)
            if ex.messages and ex.messages[0]["role"] != "system" else ex for ex in examples]


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the chat template adds to a conversation without one (SmolLM2's "You are a
    helpful AI assistant named SmolLM, ..."), or None when it adds none."""
    marker, user = "\u2063SYSTEM\u2063", [{"role": "user", "content": "hi"}]
    try:
        with_marker = render(tokenizer, [{"role": "system", "content": marker}] + user)
        without = render(tokenizer, user)
    except Exception:  # a template that refuses system messages adds none either
        return None
    if marker not in with_marker:
        return None
    head, tail = with_marker.split(marker, 1)
    tail = tail[: tail.find("hi")] if "hi" in tail else tail
    if not without.startswith(head) or tail not in without[len(head):]:
        return None
    text = without[len(head): without.index(tail, len(head))]
    return text or None


_FIELD_OF_ROLE = {"alpaca": {"system": "system", "user": "instruction", "assistant": "output"},
                  "prompt_completion": {"user": "prompt", "assistant": "completion"}}


def _fits(ex: Example, fmt: str, limit: int, issues: list[DataIssue]) -> bool:
    """Whether the row's text is within ``limit`` characters (else an issue naming its longest field)."""
    chars = len(ex.text) if ex.text is not None else sum(len(m["content"]) for m in ex.messages)
    if chars > limit:
        name = _ROW_FIELD.get(fmt) or _FIELD_OF_ROLE[fmt][max(ex.messages, key=lambda m: len(m["content"]))["role"]]
        issues.append(DataIssue(ex.line, name, f"the row holds {chars:,} characters, over the limit of {limit:,}; "
                                "split it into shorter rows"))
    return chars <= limit


def _count_skipped(report: DataReport) -> None:
    """Refuse a report without usable rows; else say how many rows were skipped (once, up to date)."""
    path = Path(report.path)
    if not report.usable:
        if not report.errors:
            raise DataError(f"{path}:1 (file): no rows")
        raise DataError(f"{report.errors[0].format(str(path))} -- and no usable rows in {path.name}: "
                        f"all {report.rows} rows were skipped")
    report.warnings = [w for w in report.warnings if not w.endswith(" rows skipped (see errors)")]
    if report.usable < report.rows:
        report.warnings.insert(0, f"{report.rows - report.usable} of {report.rows} rows skipped (see errors)")


def _is_answer_field(fmt: str, row: object, field_name: str) -> bool:
    """Whether a reported field is the answer (what the model learns to write) of its row."""
    if fmt == "alpaca":
        return field_name == "output"
    if fmt == "prompt_completion":
        return field_name == "completion"
    if fmt in ("chat", "sharegpt") and isinstance(row, dict):
        key, role_key = ("messages", "role") if fmt == "chat" else ("conversations", "from")
        m = re.fullmatch(rf"{key}\[(\d+)\]\.\w+", field_name)
        turns = row.get(key)
        if m and isinstance(turns, list) and int(m.group(1)) < len(turns) and isinstance(turns[int(m.group(1))], dict):
            role = str(turns[int(m.group(1))].get(role_key)).lower()
            return (_SHAREGPT_ROLES.get(role) if fmt == "sharegpt" else role) == "assistant"
    return False


def _quality_warnings(examples: list[Example], report: DataReport, empty_answer_lines: list[int] = ()) -> None:
    """Duplicates, the same prompt with different answers, empty answers: counted in
    ``report.quality`` (with the first few lines of each) and summed up in ``report.warnings``.

    The prompt of a chat-shaped example is everything before its last assistant turn; its answer is
    that turn. Text rows have no prompt and only count as duplicates.
    """
    seen: dict[str, int] = {}
    duplicates, duplicate_lines = 0, []
    answers: dict[str, dict[str, list[int]]] = {}  # prompt -> answer -> lines
    for ex in examples:
        key = json.dumps(ex.messages or ex.text, sort_keys=True)
        if key in seen:
            duplicates += 1
            duplicate_lines.append(ex.line)
        seen[key] = ex.line
        if ex.messages:
            last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
            prompt = json.dumps(ex.messages[:last], sort_keys=True)
            answers.setdefault(prompt, {}).setdefault(ex.messages[last]["content"].strip(), []).append(ex.line)
    conflicts = [sorted(line for lines in by_answer.values() for line in lines)
                 for by_answer in answers.values() if len(by_answer) > 1]
    report.quality = {
        "duplicates": duplicates,
        "conflicting_prompts": len(conflicts),
        "conflicting_rows": sum(len(c) for c in conflicts),
        "empty_answers": len(empty_answer_lines),
        "examples": {"duplicates": duplicate_lines[:5], "conflicting": conflicts[:5],
                     "empty_answers": list(empty_answer_lines)[:5]},
    }
    if duplicates:
        report.warnings.append(f"{duplicates} duplicate rows")
    if conflicts:
        report.warnings.append(f"{len(conflicts)} prompts have conflicting answers ({report.quality['conflicting_rows']} rows)")
    if empty_answer_lines:
        report.warnings.append(f"{len(empty_answer_lines)} rows have an empty answer (skipped)")
    if len(examples) < 20:
        report.warnings.append(f"only {len(examples)} usable rows: expect overfitting; a few hundred is a good start")


# ------------------------------------------------------------------ rendering and masking


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template a plain ChatML one (base models)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A turn's span runs from the end of the conversation rendered up to it (with the generation
    prompt) to the end of the conversation rendered including it, so it covers the reply and its
    end-of-turn token. Templates whose renderings are not prefixes of each other fall back to
    training on every token after the first user turn, and say so via the returned ``None`` spans.
    """
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not full.startswith(upto) or not upto.startswith(before):
            return full, []
        spans.append((len(before), len(upto)))
    return full, spans


def tokenize_example(tokenizer, ex: Example, max_len: int) -> dict:
    """input_ids, attention_mask, labels (-100 outside assistant turns), and whether it was cut."""
    if ex.text is not None:
        enc = tokenizer(ex.text + (tokenizer.eos_token or ""), add_special_tokens=True)
        ids = enc["input_ids"]
        labels = list(ids)
    else:
        text, spans = assistant_spans(tokenizer, ex.messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if spans:
            labels = [tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
                      for tok, (start, _end) in zip(ids, enc["offset_mapping"])]
        else:
            labels = list(ids)
    truncated = len(ids) > max_len
    ids, labels = ids[:max_len], labels[:max_len]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
            "length": len(ids), "truncated": truncated}


def tokenize_all(tokenizer, examples: list[Example], max_seq_len: int, report: DataReport) -> list[dict]:
    """`tokenize_example` for each example (with its ``line``); one the chat template or the tokenizer
    fails on is left out and reported in ``report.errors`` (its line, its field)."""
    rows, failed = [], []
    for ex in examples:
        try:
            rows.append(dict(tokenize_example(tokenizer, ex, max_seq_len), line=ex.line))
        except MemoryError:
            raise
        except Exception as e:  # a template's raise_exception, a tokenizer's TypeError: this row's problem
            why = (str(e).strip().splitlines() or [""])[0][:300]
            failed.append(DataIssue(ex.line, _ROW_FIELD.get(report.format, "(row)"),
                                    f"the chat template or the tokenizer failed on this row ({type(e).__name__}: {why})"))
    if failed:
        report.errors = sorted(report.errors + failed, key=lambda i: i.line)
        report.usable -= len(failed)
        _count_skipped(report)
    return rows


@dataclass
class PreparedData:
    train: object  # datasets.Dataset
    eval: object | None
    report: DataReport
    heldout: list[Example] = field(default_factory=list)  # the examples of ``eval``, in its order


def prepare_dataset(path: str | Path, tokenizer, max_seq_len: int, eval_fraction: float = 0.1,
                    seed: int = 42, fmt: str | None = None, system: str | None = None) -> PreparedData:
    """Load, validate, tokenize with masking, split into train/eval (as `datasets.Dataset`). A row the
    chat template or the tokenizer fails on is skipped and reported in ``report.errors``. The held-out
    examples (``heldout``: their lines and messages) are those of the eval split, never trained on."""
    from datasets import Dataset

    ensure_chat_template(tokenizer)
    examples, report = load_examples(path, fmt, row_char_limit(max_seq_len), system)
    rows = tokenize_all(tokenizer, examples, max_seq_len, report)
    report.answer_cut_off = [r["line"] for r in rows if all(label == IGNORE_INDEX for label in r["labels"])]
    no_target = len(report.answer_cut_off)
    rows = [r for r in rows if any(label != IGNORE_INDEX for label in r["labels"])]
    if no_target:
        report.warnings.append(f"{no_target} examples lost every trained token to truncation at {max_seq_len} tokens "
                               f"and were dropped ({lines_text(report.answer_cut_off)})")
    if not rows:
        raise DataError(f"{path}: every example lost its answer to truncation at {max_seq_len} tokens; raise the sequence length")
    report.truncated = sum(r["truncated"] for r in rows) + no_target
    report.token_lengths = [r["length"] for r in rows]
    if report.truncated:
        report.warnings.append(f"{report.truncated} examples were truncated at {max_seq_len} tokens")
    ds = Dataset.from_list([{k: r[k] for k in ("input_ids", "attention_mask", "labels", "line")} for r in rows])
    n_eval = int(round(len(ds) * eval_fraction)) if eval_fraction > 0 else 0
    if n_eval >= 1 and len(ds) - n_eval >= 1:
        split = ds.train_test_split(test_size=n_eval, seed=seed)  # by index: the line column changes nothing
        by_line = {ex.line: ex for ex in examples}
        heldout = [by_line[line] for line in split["test"]["line"]]
        return PreparedData(split["train"].remove_columns("line"), split["test"].remove_columns("line"), report, heldout)
    return PreparedData(ds.remove_columns("line"), None, report)


def check_file(path: str | Path, tokenizer=None, max_seq_len: int = 512) -> DataReport:
    """Validate a file (and, with a tokenizer, count truncation) without training."""
    if tokenizer is None:
        return load_examples(path, max_row_chars=row_char_limit(max_seq_len))[1]
    return prepare_dataset(path, tokenizer, max_seq_len, eval_fraction=0).report
