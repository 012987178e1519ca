"""Task evaluation of a run: did it learn the task? Greedy answers to held-out prompts from the fine-tuned
model and from the base model it started from, scored by the metric their kind of answer calls for
(`metrics.choose_metric`: exact/normalized match and per-label accuracy for labels, token F1 and ROUGE-L
for free text, JSON validity and field match, SQL execution accuracy on a database), and the perplexity
of the reference answers.

The prompts (`eval_examples`): a file the user gives (``--data``), else the run's ``test_data``, else the
held-out rows of its own data -- the eval split training kept for its eval loss and never trained on,
recorded in ``heldout.json`` when the run started (for a run from before that file, the same split is
computed again from its settings). Each row's prompt is its conversation up to the last assistant turn,
and that turn is the reference answer.

Where results go: ``<run>/eval.json`` (the whole result, with every example), summary.json's
``task_eval`` (the same without the examples; summary.json's ``eval`` keeps the final eval loss), and the
base model's replies cached in ``<run>/eval_cache/base-<key>.json`` (the key: the data file's content,
the rows, the reply length and the base model), so a second `evaluate_run` only generates with the
fine-tuned model.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import StudioError
from .metrics import MetricChoice, choose_metric, score
from .runs import RunFolder, atomic_write_json, read_json, resolve_run

HELDOUT_FILE = "heldout.json"
EVAL_FILE = "eval.json"
CACHE_DIR = "eval_cache"
MAX_REPLY_TOKENS = 256  # the longest reply evaluation generates


class TaskEvalError(StudioError):
    """A run cannot be evaluated on its task as asked (no held-out rows, no answers, no adapter)."""


@dataclass
class EvalExample:
    line: int  # the row's line in its file
    prompt: list[dict]  # the conversation up to the reference answer
    reference: str

    @property
    def question(self) -> str:
        users = [m["content"] for m in self.prompt if m.get("role") == "user"]
        return users[-1] if users else ""

    def to_dict(self) -> dict:
        return {"line": self.line, "messages": self.prompt, "reference": self.reference}


def to_eval_example(ex) -> EvalExample | None:
    """A `data.Example` as a prompt and its reference (the last assistant turn); None for a text row."""
    if not ex.messages:
        return None
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    return EvalExample(ex.line, ex.messages[:last], ex.messages[last]["content"])


def examples_from_file(path, fmt: str | None = None, lines: list[int] | None = None,
                       max_row_chars: int | None = None, system: str | None = None) -> list[EvalExample]:
    """The prompt/answer rows of a data file (any chat-shaped format), or those on ``lines`` in that order;
    ``system``: the run's ``system_prompt`` setting (`data.with_system`), as training applied it."""
    from .data import load_examples

    examples, report = load_examples(path, fmt, max_row_chars, system)
    if report.format == "text":
        raise TaskEvalError(f"{path}: plain text rows have no prompt and answer to compare", field="data",
                            hint="evaluate on rows with an answer (chat messages, prompt/completion, "
                                 "instruction/output); the eval loss is in summary.json")
    out = [e for e in map(to_eval_example, examples) if e is not None]
    if lines is not None:
        by_line = {e.line: e for e in out}
        out = [by_line[n] for n in lines if n in by_line]
    return out


# ------------------------------------------------------------------ which rows


def record_heldout(run: RunFolder, cfg, data) -> None:
    """Write ``heldout.json``: the data file's lines that training holds out (`data.PreparedData.heldout`)."""
    atomic_write_json(run.path / HELDOUT_FILE, {"data": str(Path(cfg.data).expanduser().resolve()),
                                                "sha256": data.report.sha256, "format": data.report.format,
                                                "lines": [ex.line for ex in data.heldout]})


def _recompute_heldout(folder: RunFolder, cfg: dict) -> dict:
    """The held-out lines of a run from before ``heldout.json``: the same split, computed again."""
    from .data import prepare_dataset
    from .loading import load_tokenizer

    tok_path = folder.adapter if (folder.adapter / "tokenizer_config.json").is_file() else _base_path(folder)
    data = prepare_dataset(cfg["data"], load_tokenizer(tok_path), cfg.get("max_seq_len") or 512,
                           cfg.get("eval_fraction") or 0.0, cfg.get("seed", 42), cfg.get("data_format"))
    return {"data": cfg["data"], "sha256": data.report.sha256, "format": data.report.format,
            "lines": [ex.line for ex in data.heldout]}


def eval_examples(run, data: str | Path | None = None) -> tuple[list[EvalExample], dict]:
    """(examples, source) a run is evaluated on: ``data`` if given, else its ``test_data``, else its
    held-out rows. ``source``: the file, its sha256 and which rows ("file" or "held-out")."""
    from .data import row_char_limit
    from .datafile import file_sha256

    folder = run if isinstance(run, RunFolder) else RunFolder(resolve_run(run))
    cfg = folder.config()
    path = data or cfg.get("test_data")
    if path:
        path = Path(path).expanduser()
        if not path.is_file():
            raise TaskEvalError(f"data: {path}: no such file", field="data")
        examples = examples_from_file(path, None if data else cfg.get("data_format"),
                                      max_row_chars=row_char_limit(cfg.get("max_seq_len")),
                                      system=cfg.get("system_prompt"))
        source = {"data": str(path.resolve()), "sha256": file_sha256(path), "rows": "file"}
    else:
        held = read_json(folder.path / HELDOUT_FILE) or _recompute_heldout(folder, cfg)
        if not held.get("lines"):
            raise TaskEvalError(f"{folder.name}: the run kept no held-out rows (eval_fraction "
                                f"{cfg.get('eval_fraction')}) and has no test_data", field="data",
                                hint="give an eval file with --data FILE")
        if file_sha256(held["data"]) != held["sha256"]:
            raise TaskEvalError(f"{held['data']}: the file changed since the run started, so its held-out rows "
                                "cannot be told apart", field="data", hint="give an eval file with --data FILE")
        examples = examples_from_file(held["data"], held.get("format"), held["lines"],
                                      row_char_limit(cfg.get("max_seq_len")), cfg.get("system_prompt"))
        source = {"data": held["data"], "sha256": held["sha256"], "rows": "held-out"}
    if not examples:
        raise TaskEvalError(f"{source['data']}: no rows with an answer to evaluate", field="data")
    return examples, source


def eval_db(cfg: dict, db: str | Path | None = None) -> Path | None:
    """The SQLite database of the sql metric: ``db`` if given, else the run's ``eval_db``, else the sample
    warehouse for a run whose task is sql; None otherwise."""
    chosen = db or cfg.get("eval_db")
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise TaskEvalError(f"db: {path}: no such file", field="db", hint="give the SQLite database file")
        return path
    if (cfg.get("task") or "").lower() == "sql":
        from .evaluate import warehouse_db_path

        return warehouse_db_path()
    return None


def reply_budget(tok, references: list[str], cap: int = MAX_REPLY_TOKENS) -> int:
    """New tokens to generate for these references: half again the longest one plus 8, at most ``cap``."""
    longest = max((len(tok(r, add_special_tokens=False)["input_ids"]) for r in references), default=0)
    return max(8, min(cap, int(1.5 * longest) + 8))


# ------------------------------------------------------------------ models


def _base_path(folder: RunFolder) -> Path:
    from .chat import _base_path as base_of_run

    return base_of_run(folder)


def load_eval_model(folder: RunFolder):
    """(model, tokenizer): the base in 16-bit (32 on the CPU) with the run's adapter unmerged, in eval mode,
    so that ``model.disable_adapter()`` gives the base model itself."""
    from .chat import load_chat_model
    from .data import ensure_chat_template
    from .loading import load_tokenizer

    if not (folder.adapter / "adapter_config.json").is_file():
        raise TaskEvalError(f"{folder.name}: no adapter yet (the run has not finished or was stopped before saving)",
                            hint="wait for the run to finish, or resume it")
    model, tok = load_chat_model(_base_path(folder), adapter=folder.adapter)
    if (folder.adapter / "tokenizer_config.json").is_file():  # the template training used
        tok = load_tokenizer(folder.adapter)
    ensure_chat_template(tok)
    return model, tok


def perplexity(model, tok, examples: list[EvalExample], max_len: int) -> float | None:
    """exp of the mean negative log-likelihood of the reference answers' tokens (masked as in training)."""
    import torch

    from .data import Example, tokenize_example

    nll, count = 0.0, 0
    for e in examples:
        enc = tokenize_example(tok, Example(e.line, messages=e.prompt + [{"role": "assistant", "content": e.reference}]),
                               max_len)
        n = sum(1 for label in enc["labels"][1:] if label != -100)
        if not n:
            continue
        ids = torch.tensor([enc["input_ids"]], device=model.device)
        with torch.no_grad():
            loss = model(input_ids=ids, labels=torch.tensor([enc["labels"]], device=model.device)).loss
        nll += float(loss) * n
        count += n
    return math.exp(nll / count) if count else None


def _answer(model, tok, examples, max_new_tokens, max_len, label, progress) -> dict:
    from .chat import generate_batch

    t0 = time.time()
    replies = generate_batch(model, tok, [e.prompt for e in examples], max_new_tokens=max_new_tokens,
                             progress=lambda done, total: progress(f"{label}: {done}/{total} replies"))
    return {"replies": replies, "perplexity": perplexity(model, tok, examples, max_len), "seconds": time.time() - t0}


def _cache_key(source: dict, examples: list[EvalExample], max_new_tokens: int, max_len: int, base: Path) -> str:
    key = {"sha256": source["sha256"], "lines": [e.line for e in examples], "max_new_tokens": max_new_tokens,
           "max_len": max_len, "base": str(base)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ the evaluation


def evaluate_run(run, *, data: str | Path | None = None, metric: str | None = None, db: str | Path | None = None,
                 limit: int | None = None, base: bool = True,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Evaluate a run's fine-tuned model (and, with ``base``, its base model) on held-out prompts.

    Returns (and writes to eval.json; summary.json's ``task_eval`` without the examples)::

        {"run", "task": the kind of answer, "metric", "primary": the figure it is judged by, "reason",
         "data", "rows": "held-out" | "file", "n", "max_new_tokens",
         "metrics": {fine-tuned figures..., "perplexity"}, "base": {same for the base} | None,
         "seconds": {"fine_tuned", "base", "base_cached"}, "examples": [{"line", "prompt", "reference",
         "reply", "score", "base_reply", "base_score"}]}
    """
    folder = run if isinstance(run, RunFolder) else RunFolder(resolve_run(run))
    progress = progress or (lambda message: None)
    cfg = folder.config()
    if limit is not None and limit < 1:
        raise TaskEvalError(f"limit: must be >= 1, got {limit}", field="limit")
    examples, source = eval_examples(folder, data)
    database = eval_db(cfg, db)
    choice: MetricChoice = choose_metric(metric or cfg.get("eval_metric"), [e.reference for e in examples],
                                         task=cfg.get("task"), db=database)  # the kind of answer: from every row
    examples = examples[:limit]
    references = [e.reference for e in examples]
    progress(f"{len(examples)} prompts from {source['data']} ({source['rows']} rows); metric {choice.metric}: "
             f"{choice.reason}")
    model, tok = load_eval_model(folder)
    max_new_tokens = reply_budget(tok, references)
    max_len = max(cfg.get("max_seq_len") or 512, max_new_tokens)
    tuned = _answer(model, tok, examples, max_new_tokens, max_len, "fine-tuned", progress)
    metrics, scores = score(choice.metric, tuned["replies"], references, db=database)
    metrics["perplexity"] = tuned["perplexity"]
    result = {"run": folder.name, "task": choice.kind, "metric": choice.metric, "primary": choice.primary,
              "reason": choice.reason, "data": source["data"], "rows": source["rows"], "n": len(examples),
              "max_new_tokens": max_new_tokens, "metrics": metrics, "base": None,
              "seconds": {"fine_tuned": tuned["seconds"], "base": None, "base_cached": False}}
    base_run = None
    if base:
        base_path = _base_path(folder)
        cache = folder.path / CACHE_DIR / f"base-{_cache_key(source, examples, max_new_tokens, max_len, base_path)}.json"
        base_run = read_json(cache)
        if not isinstance(base_run, dict) or len(base_run.get("replies") or []) != len(examples):
            with model.disable_adapter():
                base_run = _answer(model, tok, examples, max_new_tokens, max_len, "base", progress)
            cache.parent.mkdir(exist_ok=True)
            atomic_write_json(cache, base_run)
        else:
            result["seconds"]["base_cached"] = True
        result["base"], base_scores = score(choice.metric, base_run["replies"], references, db=database)
        result["base"]["perplexity"] = base_run["perplexity"]
        result["seconds"]["base"] = base_run["seconds"]
    result["examples"] = [
        {"line": e.line, "prompt": e.question, "reference": e.reference, "reply": reply, "score": s,
         **({"base_reply": base_run["replies"][i], "base_score": base_scores[i]} if base_run else {})}
        for i, (e, reply, s) in enumerate(zip(examples, tuned["replies"], scores))]
    atomic_write_json(folder.path / EVAL_FILE, result)
    summary = folder.summary()
    if summary:
        summary["task_eval"] = dict({k: v for k, v in result.items() if k != "examples"}, file=EVAL_FILE,
                                    time=time.time())
        folder.write_summary(summary)
    return result
