"""Scores for model replies against reference answers, chosen by the kind of answer.

The metrics, by the name ``qlora-studio eval --metric`` and the ``eval_metric`` setting take:

* ``exact`` -- ``exact_match`` (the same text, outer spaces aside) and ``normalized_match`` (the same
  words after `normalize_text`: lower case, punctuation, the articles a/an/the and extra spaces gone);
  for label-like answers also ``per_label`` (rows and accuracy per reference label) and ``confusion``
  (reference label -> replied label -> count; a reply that is none of the labels counts as "(other)");
* ``f1`` -- ``token_f1``: the overlap of the normalized words of reply and reference (F1 of a bag of
  words), with ``exact_match`` and ``normalized_match``;
* ``rouge`` -- ``rouge_l``: the ROUGE-L F-measure (longest common subsequence of words) computed by the
  ``rouge-score`` package on the normalized words (any script: words are ``\\w+`` runs), with ``token_f1``
  and ``exact_match`` and ``chrf``;
* ``chrf`` -- ``chrf``: the character n-gram F-score (chrF, ``sacrebleu``'s implementation, on a 0-1 scale):
  kind to inflected words and to languages without spaces, with ``rouge_l``, ``token_f1`` and ``exact_match``;
* ``json`` -- ``json_valid`` (the reply holds a JSON value: bare, in a code fence or after prose),
  ``field_match`` (F1 of the (path, value) leaves of reply and reference; strings compared normalized,
  numbers by value) and ``exact_match`` (the same JSON value);
* ``sql`` -- ``execution_accuracy``, ``exact_match`` and ``errors`` on an SQLite database
  (`evaluate.score_sql`, the text-to-SQL scorer).

`choose_metric` is the one place that decides which metric a set of references gets: the kind of
answer (`answer_kind`: sql, json, label, short, text) picks it unless the user named one. `score`
computes a metric's figures and a score per reply (0-1, the metric's primary figure for that row).
Standard library, ``rouge-score`` and ``sacrebleu`` only: no model is needed to score.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

from .errors import StudioError

METRICS = ("exact", "f1", "rouge", "chrf", "json", "sql")
# The figure each metric is judged by (the best checkpoint, "better than the base").
PRIMARY = {"exact": "normalized_match", "f1": "token_f1", "rouge": "rouge_l", "chrf": "chrf", "json": "field_match",
           "sql": "execution_accuracy"}
KINDS = ("sql", "json", "label", "short", "text")
AUTO_METRIC = {"sql": "sql", "json": "json", "label": "exact", "short": "exact", "text": "rouge"}
OTHER_LABEL = "(other)"
# Label-like answers: every reference at most LABEL_MAX_WORDS words and LABEL_MAX_CHARS characters, at most
# LABEL_MAX_DISTINCT distinct ones, each seen on average at least twice.
LABEL_MAX_WORDS, LABEL_MAX_CHARS, LABEL_MAX_DISTINCT = 4, 40, 50
SHORT_MAX_WORDS = 6  # short answers: the median reference has at most this many words


class MetricError(StudioError):
    """A metric cannot score these answers (no database for SQL, a reference that is not JSON)."""


@dataclass
class MetricChoice:
    metric: str  # one of METRICS
    kind: str  # one of KINDS: what the references look like
    reason: str

    @property
    def primary(self) -> str:
        return PRIMARY[self.metric]

    def to_dict(self) -> dict:
        return dict(asdict(self), primary=self.primary)


# ------------------------------------------------------------------ text


_CHAT_TOKEN = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?s>")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_WORD = re.compile(r"\w+")


def clean_reply(text: str) -> str:
    """A reply up to the first chat special token (``<|im_end|>``...), without outer spaces."""
    return _CHAT_TOKEN.split(text or "", maxsplit=1)[0].strip()


def normalize_text(text: str) -> str:
    """Lower case, Unicode-normalized (NFKC), punctuation and the articles a/an/the removed, words joined by
    single spaces."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return " ".join(_ARTICLES.sub(" ", " ".join(_WORD.findall(text))).split())


def words(text: str) -> list[str]:
    return normalize_text(text).split()


def token_f1(reply: str, reference: str) -> float:
    """F1 of the normalized words of ``reply`` against those of ``reference`` (1.0 when both are empty)."""
    pred, gold = words(reply), words(reference)
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if not common:
        return 0.0
    p, r = common / len(pred), common / len(gold)
    return 2 * p * r / (p + r)


class _Words:
    """The tokenizer `rouge_score` is given: normalized ``\\w+`` words, so text in any script counts."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


_rouge = None


def rouge_l(reply: str, reference: str) -> float:
    """ROUGE-L F-measure (``rouge-score``) of ``reply`` against ``reference``."""
    global _rouge
    if _rouge is None:
        from rouge_score import rouge_scorer

        _rouge = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Words())
    if not words(reference) and not words(reply):
        return 1.0
    return _rouge.score(reference, reply)["rougeL"].fmeasure


_chrf = None


def chrf(reply: str, reference: str) -> float:
    """chrF (``sacrebleu``: character 6-grams, beta 2) of ``reply`` against ``reference``, on a 0-1 scale."""
    global _chrf
    if _chrf is None:
        from sacrebleu.metrics import CHRF

        _chrf = CHRF()
    if not reference.strip() and not reply.strip():
        return 1.0
    return _chrf.sentence_score(reply, [reference]).score / 100.0


# ------------------------------------------------------------------ JSON


_FENCE = re.compile(r"```(?:[A-Za-z0-9_+-]*[ \t]*\r?\n)?(.*?)(?:```|\Z)", re.S)
_NO_VALUE = object()


def parse_json_reply(text: str):
    """The JSON value a reply holds (bare, in a code fence, or the first object/array after prose), or
    `_NO_VALUE`."""
    text = clean_reply(text)
    fence = _FENCE.search(text)
    candidates = [fence.group(1).strip()] if fence else []
    candidates.append(text)
    decoder = json.JSONDecoder()
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            pass
        for m in re.finditer(r"[\[{]", candidate):
            try:
                return decoder.raw_decode(candidate, m.start())[0]
            except ValueError:
                continue
    return _NO_VALUE


def _leaves(value, path: str = "$") -> list[tuple[str, object]]:
    """(path, value) of every scalar in a JSON value; an empty object or list is a leaf of its own."""
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{path}.{k}")]
    if isinstance(value, list) and value:
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path, _canonical(value))]


def _canonical(value):
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return normalize_text(value)
    return json.dumps(value, sort_keys=True)  # {} or []


def field_match(reply_value, reference_value) -> float:
    """F1 of the (path, value) leaves of two JSON values (0.0 when the reply holds none)."""
    if reply_value is _NO_VALUE:
        return 0.0
    pred, gold = Counter(_leaves(reply_value)), Counter(_leaves(reference_value))
    common = sum((pred & gold).values())
    if not common:
        return 0.0
    p, r = common / sum(pred.values()), common / sum(gold.values())
    return 2 * p * r / (p + r)


# ------------------------------------------------------------------ choosing


def _is_json_answer(text: str) -> bool:
    text = text.strip()
    if not text or text[0] not in "[{":
        return False
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _looks_like_sql(text: str) -> bool:
    return bool(re.match(r"\s*(?:SELECT|WITH)\b", text, re.I))


def is_label_like(references: Sequence[str]) -> bool:
    """Whether the references look like class labels: short, few distinct values, each repeated."""
    if not references:
        return False
    norm = [normalize_text(r) for r in references]
    if any(len(r.split()) > LABEL_MAX_WORDS or len(r.strip()) > LABEL_MAX_CHARS for r in references):
        return False
    distinct = len(set(norm))
    return distinct <= LABEL_MAX_DISTINCT and distinct * 2 <= len(norm)


def answer_kind(references: Sequence[str], task: str | None = None, db=None) -> tuple[str, str]:
    """(kind, why) of a set of reference answers: sql (the task is SQL, or a database was given and the
    answers are queries), json (9 in 10 answers are a JSON object or array), label (`is_label_like`),
    short (the median answer has at most SHORT_MAX_WORDS words) or text."""
    n = len(references)
    if (task or "").lower() == "sql":
        return "sql", "the run's task is sql"
    if db is not None and n and sum(map(_looks_like_sql, references)) * 2 > n:
        return "sql", "a database was given and most answers are SQL queries"
    if n and sum(map(_is_json_answer, references)) >= 0.9 * n:
        return "json", "the answers are JSON objects or arrays"
    if is_label_like(references):
        labels = len({normalize_text(r) for r in references})
        return "label", f"the answers are short labels ({labels} distinct in {n} rows)"
    lengths = [len(r.split()) for r in references] or [0]
    median = statistics.median(lengths)
    if median <= SHORT_MAX_WORDS:
        return "short", f"the answers are short (median {median:g} words)"
    return "text", f"the answers are free text (median {median:g} words)"


def choose_metric(requested: str | None, references: Sequence[str], *, task: str | None = None,
                  db=None) -> MetricChoice:
    """The metric for these references: ``requested`` (a name from METRICS) or, for None/"auto", the one
    their kind of answer calls for (`AUTO_METRIC`). SQL needs a database (``db``)."""
    kind, why = answer_kind(references, task, db)
    if requested in (None, "", "auto"):
        metric, reason = AUTO_METRIC[kind], why
    elif requested in METRICS:
        metric, reason = requested, f"asked for (the answers look like: {kind})"
    else:
        raise MetricError(f"metric: {requested!r} is not one of auto, {', '.join(METRICS)}", field="metric",
                          hint="leave it on auto to choose by the kind of answer")
    if metric == "sql" and db is None:
        raise MetricError("metric sql: execution accuracy needs the SQLite database the queries run on",
                          field="db", hint="give it with --db FILE (the eval_db setting)")
    return MetricChoice(metric, kind, reason)


# ------------------------------------------------------------------ scoring


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _labels(replies: list[str], references: Sequence[str]) -> dict:
    """Accuracy per reference label and the confusion table (label -> replied label -> rows)."""
    shown: dict[str, str] = {}
    for r in references:
        shown.setdefault(normalize_text(r), r.strip())
    per_label: dict[str, dict] = {}
    confusion: dict[str, dict[str, int]] = {}
    for reply, ref in zip(replies, references):
        gold = shown[normalize_text(ref)]
        pred = shown.get(normalize_text(reply), OTHER_LABEL)
        row = per_label.setdefault(gold, {"n": 0, "correct": 0})
        row["n"] += 1
        row["correct"] += pred == gold
        confusion.setdefault(gold, {})
        confusion[gold][pred] = confusion[gold].get(pred, 0) + 1
    for row in per_label.values():
        row["accuracy"] = row.pop("correct") / row["n"]
    return {"per_label": per_label, "confusion": confusion}


def score(metric: str, replies: Sequence[str], references: Sequence[str], *, db=None) -> tuple[dict, list[float]]:
    """(figures, per-reply scores) of ``metric`` for replies against references. Figures hold ``n`` and
    the metric's fractions (0-1); each reply's score is its primary figure (`PRIMARY`)."""
    if len(replies) != len(references):
        raise ValueError(f"{len(replies)} replies for {len(references)} references")
    if metric not in METRICS:
        raise MetricError(f"metric: {metric!r} is not one of {', '.join(METRICS)}", field="metric")
    n = len(references)
    if metric == "sql":
        from .evaluate import sql_scores

        if db is None:
            raise MetricError("metric sql: no database to run the queries on", field="db", hint="give --db FILE")
        each = sql_scores(replies, references, db)
        figures = {"n": n, "execution_accuracy": _mean([e["executed"] for e in each]),
                   "exact_match": _mean([e["exact"] for e in each]), "errors": sum(e["error"] for e in each)}
        return figures, [float(e["executed"]) for e in each]
    cleaned = [clean_reply(r) for r in replies]
    exact = [float(c == ref.strip()) for c, ref in zip(cleaned, references)]
    if metric == "json":
        parsed = [parse_json_reply(c) for c in cleaned]
        gold = []
        for i, ref in enumerate(references):
            try:
                gold.append(json.loads(ref))
            except ValueError:
                raise MetricError(f"metric json: reference answer {i + 1} is not JSON ({ref[:60]!r})", field="metric",
                                  hint="choose another metric (exact, f1 or rouge) for these answers") from None
        fields = [field_match(p, g) for p, g in zip(parsed, gold)]
        figures = {"n": n, "json_valid": _mean([float(p is not _NO_VALUE) for p in parsed]),
                   "field_match": _mean(fields),
                   "exact_match": _mean([float(p is not _NO_VALUE and p == g) for p, g in zip(parsed, gold)])}
        return figures, fields
    normalized = [float(normalize_text(c) == normalize_text(ref)) for c, ref in zip(cleaned, references)]
    figures = {"n": n, "exact_match": _mean(exact), "normalized_match": _mean(normalized)}
    if metric == "exact":
        if is_label_like(references):
            figures.update(_labels(cleaned, references))
        return figures, normalized
    f1 = [token_f1(c, ref) for c, ref in zip(cleaned, references)]
    figures["token_f1"] = _mean(f1)
    if metric == "f1":
        return figures, f1
    rouge = [rouge_l(c, ref) for c, ref in zip(cleaned, references)]
    figures["rouge_l"] = _mean(rouge)
    chars = [chrf(c, ref) for c, ref in zip(cleaned, references)]
    figures["chrf"] = _mean(chars)
    return figures, (chars if metric == "chrf" else rouge)
