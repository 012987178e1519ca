"""Training data: load a file, detect its shape, validate each row, render and mask it.

Shapes detected automatically (by the keys most rows carry):
- ``chat``:   {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
- ``sharegpt``: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
- ``alpaca``: {"instruction": ..., "input": ... (optional), "output": ...}
- ``prompt_completion``: {"prompt": ..., "completion": ...}
- ``text``:   {"text": ...} (trained on every token)

Files: .jsonl, .json (a list of rows, or an object holding one), .csv, .parquet. Every row keeps the
line (or row) number it came from, so problems are reported as ``file:line field: message``. A file
with a few bad rows is still usable: it trains on the good rows and reports the rest.

Loss is computed on assistant tokens only: the conversation is rendered with the model's chat
template, and each assistant turn's character span is found by rendering the conversation up to that
turn; tokens whose characters fall outside those spans get the label -100.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import StudioError

FORMATS = ("chat", "sharegpt", "alpaca", "prompt_completion", "text")
IGNORE_INDEX = -100
# A plain ChatML template for models that ship none (base models).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system", "bot": "assistant"}


class DataError(StudioError):
    """The file cannot be used at all; the message names file, line and field."""


@dataclass
class DataIssue:
    line: int  # 1-based line (JSONL, CSV data row incl. header offset) or row number (JSON, Parquet)
    field: str
    message: str

    def format(self, path: str) -> str:
        return f"{path}:{self.line} {self.field}: {self.message}"


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
    token_lengths: list[int] = field(default_factory=list)
    sha256: str = ""
    # Counts for the quality checks (see `_quality_warnings`): duplicates, conflicting_prompts,
    # conflicting_rows, empty_answers, and "examples": the first few lines of each.
    quality: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["token_lengths"] = _length_stats(self.token_lengths)
        return d


def _length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    s = sorted(lengths)
    return {"min": s[0], "median": statistics.median(s), "p95": s[min(len(s) - 1, int(0.95 * len(s)))], "max": s[-1]}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ reading rows


def _read_rows(path: Path) -> tuple[list[tuple[int, object]], list[DataIssue]]:
    """Rows as (line, value) pairs, plus the rows that could not even be parsed."""
    suffix = path.suffix.lower()
    rows: list[tuple[int, object]] = []
    issues: list[DataIssue] = []
    if suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    issues.append(DataIssue(n, "(json)", f"not valid JSON: {e.msg} at column {e.colno}"))
    elif suffix == ".json":
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            # A .json file with one object per line is really JSONL.
            if e.msg == "Extra data" and text.lstrip().startswith("{"):
                return _read_rows_jsonl_text(text)
            raise DataError(f"{path}:{e.lineno} (json): not valid JSON: {e.msg} at column {e.colno}") from e
        if isinstance(value, dict):
            lists = [v for v in value.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"{path}:1 (json): expected a list of rows, or an object holding exactly one list")
            value = lists[0]
        if not isinstance(value, list):
            raise DataError(f"{path}:1 (json): expected a list of rows")
        rows = [(i, v) for i, v in enumerate(value, 1)]
    elif suffix == ".csv":
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise DataError(f"{path}:1 (header): the CSV file has no header row")
            for row in reader:
                rows.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise DataError(f"{path}:1 (parquet): cannot read this Parquet file ({e})") from e
        rows = [(i, v) for i, v in enumerate(table.to_pylist(), 1)]
    else:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .jsonl, .json, .csv or .parquet")
    return rows, issues


def _read_rows_jsonl_text(text: str) -> tuple[list[tuple[int, object]], list[DataIssue]]:
    rows, issues = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                issues.append(DataIssue(n, "(json)", f"not valid JSON: {e.msg} at column {e.colno}"))
    return rows, issues


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
    return value


def _check_turns(turns: list[dict], line: int, key: str, issues: list[DataIssue]) -> list[dict] | None:
    if not turns:
        issues.append(DataIssue(line, key, "no messages"))
        return None
    if not any(t["role"] == "assistant" for t in turns):
        issues.append(DataIssue(line, key, "no assistant message to learn from"))
        return None
    for i, t in enumerate(turns):
        if t["role"] == "system" and i != 0:
            issues.append(DataIssue(line, f"{key}[{i}].role", "a system message may only come first"))
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
        if not (instruction and output):
            return None
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if isinstance(row.get("system"), str) and row["system"].strip():
            msgs.insert(0, {"role": "system", "content": row["system"]})
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
    turns = _check_turns(turns, line, key, issues)
    return Example(line, messages=turns) if turns else None


def load_examples(path: str | Path, fmt: str | None = None) -> tuple[list[Example], DataReport]:
    """Read, detect and validate a data file. Raises `DataError` if nothing in it is usable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows, issues = _read_rows(path)
    if not rows:
        raise DataError(f"{path}:1 (file): no rows" + (f"; first problem: {issues[0].format(str(path))}" if issues else ""))
    fmt = fmt or detect_format(rows)
    if fmt is None:
        keys = sorted(rows[0][1].keys()) if isinstance(rows[0][1], dict) else []
        raise DataError(
            f"{path}:{rows[0][0]} (fields): cannot tell the format from the fields {keys}; expected one of "
            "messages | conversations | instruction+output | prompt+completion | text"
        )
    examples = [ex for line, row in rows if (ex := _to_example(fmt, line, row, issues))]
    report = DataReport(str(path), fmt, rows=len(rows) + sum(1 for i in issues if i.field == "(json)"),
                        usable=len(examples), errors=issues, sha256=file_sha256(path))
    if not examples:
        first = issues[0].format(str(path)) if issues else f"{path}: no usable rows"
        raise DataError(f"no usable rows in {path}; first problem: {first}")
    if issues:
        report.warnings.append(f"{len(issues)} of {report.rows} rows skipped (see errors)")
    by_line = dict(rows)
    empty_lines = [i.line for i in issues if i.message == "empty" and _is_answer_field(fmt, by_line.get(i.line), i.field)]
    _quality_warnings(examples, report, empty_lines)
    return examples, report


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


@dataclass
class PreparedData:
    train: object  # datasets.Dataset
    eval: object | None
    report: DataReport


def prepare_dataset(path: str | Path, tokenizer, max_seq_len: int, eval_fraction: float = 0.1,
                    seed: int = 42, fmt: str | None = None) -> PreparedData:
    """Load, validate, tokenize with masking, split into train/eval (as `datasets.Dataset`)."""
    from datasets import Dataset

    ensure_chat_template(tokenizer)
    examples, report = load_examples(path, fmt)
    rows = [tokenize_example(tokenizer, ex, max_seq_len) for ex in examples]
    no_target = sum(1 for r in rows if all(label == IGNORE_INDEX for label in r["labels"]))
    rows = [r for r in rows if any(label != IGNORE_INDEX for label in r["labels"])]
    if no_target:
        report.warnings.append(f"{no_target} examples lost every trained token to truncation at {max_seq_len} tokens and were dropped")
    if not rows:
        raise DataError(f"{path}: every example lost its answer to truncation at {max_seq_len} tokens; raise the sequence length")
    report.truncated = sum(r["truncated"] for r in rows) + no_target
    report.token_lengths = [r["length"] for r in rows]
    if report.truncated:
        report.warnings.append(f"{report.truncated} examples were truncated at {max_seq_len} tokens")
    ds = Dataset.from_list([{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows])
    n_eval = int(round(len(ds) * eval_fraction)) if eval_fraction > 0 else 0
    if n_eval >= 1 and len(ds) - n_eval >= 1:
        split = ds.train_test_split(test_size=n_eval, seed=seed)
        return PreparedData(split["train"], split["test"], report)
    return PreparedData(ds, None, report)


def check_file(path: str | Path, tokenizer=None, max_seq_len: int = 512) -> DataReport:
    """Validate a file (and, with a tokenizer, count truncation) without training."""
    if tokenizer is None:
        return load_examples(path)[1]
    return prepare_dataset(path, tokenizer, max_seq_len, eval_fraction=0).report
