"""Findings about a whole run rather than its curves: out of memory (from status.json), a card left
mostly unused (from summary.json), and data problems (from data_report.json)."""

from __future__ import annotations

from .data import lines_text
from .finding import Finding, Fix, _finite, _Settings

# Under-used card: the measured peak is below this share of the card's memory (or of the estimate).
UNDERUSED_SHARE = 0.5
# Data: the share of examples at which a data problem becomes a warning instead of a note.
DATA_WARN_SHARE = 0.05
DUPLICATE_WARN_SHARE = 0.10



def oom_findings(status: dict | None, config: dict | None = None) -> list[Finding]:
    """An out-of-memory failure (error), and each automatic recovery from one (a note)."""
    status = status or {}
    s = _Settings(config)
    out = []
    for rec in status.get("recoveries") or []:
        if "decoded_weights" in rec:
            change = "the 4-bit weights decoded at each use instead of kept decoded (the same numbers)"
        else:
            change = (f"micro-batch {rec.get('batch_size', ['?', '?'])[0]} -> {rec.get('batch_size', ['?', '?'])[1]}, "
                      f"gradient accumulation {rec.get('grad_accum', ['?', '?'])[0]} -> "
                      f"{rec.get('grad_accum', ['?', '?'])[1]} (same effective batch)")
        out.append(Finding("oom", "info", int(rec.get("step") or 0),
                           f"Ran out of memory at step {rec.get('step')}; recovered by itself: {change}, continued "
                           f"from {rec.get('resumed_from') or 'the start'}.", [], dict(rec)))
    if status.get("error_kind") != "oom":
        return out
    step = int(status.get("error_step") or status.get("step") or 0)
    fixes = []
    if s.decoded_weights:  # the decoded copy of the base a CPU run keeps (`plan_memory.decoded_weights`)
        fixes.append(Fix("Decode the 4-bit weights at each use", {"decoded_weights": False},
                         "the run kept a decoded copy of the base's 4-bit weights for speed; without it each weight costs "
                         "about half a byte instead of 2.5 (bf16) or 4.5 (fp32): the same numbers, each step somewhat "
                         "slower"))
    if s.gradient_checkpointing is False:
        fixes.append(Fix("Turn on gradient checkpointing", {"gradient_checkpointing": True},
                         "activations are recomputed in backward instead of kept: much less memory, about a third "
                         "more compute"))
    if s.batch_size > 2 or s.batch_size == 2 and s.grad_accum == 1:
        b = 2 if s.batch_size > 2 else 1
        ga = max(1, s.grad_accum * s.batch_size // b)
        fixes.append(Fix(f"Micro-batch {b} with gradient accumulation {ga}",
                         {"batch_size": b, "grad_accum": ga},
                         f"activations grow with the micro-batch; accumulating {ga} micro-batches keeps the "
                         f"effective batch at {b * ga}"))
    if s.quant != "nf4" or not s.double_quant:
        fixes.append(Fix("Turn on NF4 with double quantization", {"quant": "nf4", "double_quant": True},
                         "4-bit NF4 weights take a quarter of 16-bit ones; without it memory roughly doubles"))
    if s.max_seq_len > 128:
        n = max(128, s.max_seq_len // 2)
        fixes.append(Fix(f"Shorter sequences ({s.max_seq_len} -> {n} tokens)", {"max_seq_len": n},
                         "activation memory grows with the sequence length; longer examples get cut"))
    fixes.append(Fix("Use a smaller model", {}, "going from 7B to 3B parameters cuts the weights' memory by more than half; "
                     "`qlora-studio recommend` shows what fits this card"))
    fixes.append(Fix("Use a GPU with more memory", {}, "`qlora-studio recommend --gpu NAME` tells what a card can train"))
    where = f"at step {step}" if step else "before the first step"
    retries = status.get("recoveries") or []
    tried = f" after {len(retries)} automatic retries with smaller micro-batches" if retries else ""
    out.append(Finding("oom", "error", step,
                       f"The run ran out of memory {where}{tried}. The memory was released and the last checkpoint "
                       "was kept, so a fix can continue from it.", fixes,
                       {"error": status.get("error"), "recoveries": len(retries)}))
    return out


def underused_findings(summary: dict | None, config: dict | None = None, records: list[dict] | None = None,
                       data_report: dict | None = None) -> list[Finding]:
    """On CUDA: the measured peak below UNDERUSED_SHARE (50%) of the card's memory (or, if the card's
    size is not recorded, of the estimate) -- a larger micro-batch or longer sequences would fit. A
    note, not a warning: the run is fine, it could just be faster."""
    summary = summary or {}
    s = _Settings(config)
    device = summary.get("device") or s.device
    if device != "cuda":
        return []
    peak_mb = (summary.get("peak_memory") or {}).get("memory_reserved_mb")
    if not _finite(peak_mb):
        seen = [r.get("memory_reserved_mb") for r in records or [] if _finite(r.get("memory_reserved_mb"))]
        peak_mb = max(seen) if seen else None
    if not peak_mb:
        return []
    card_mb = summary.get("gpu_total_mb")
    est = (summary.get("memory_estimate") or {}).get("estimated_bytes")
    if _finite(card_mb):
        ref_mb, ref_name = card_mb, "the card's memory"
    elif _finite(est):
        ref_mb, ref_name = est / 2**20, "the estimate"
    else:
        return []
    share = peak_mb / ref_mb
    if share >= UNDERUSED_SHARE:
        return []
    fixes = []
    b = s.batch_size * 2
    if s.grad_accum >= 2:
        fixes.append(Fix(f"Larger micro-batch ({s.batch_size} -> {b}), half the accumulation",
                         {"batch_size": b, "grad_accum": s.grad_accum // 2},
                         "the same effective batch in fewer, fuller steps: faster"))
    else:
        fixes.append(Fix(f"Larger batch ({s.batch_size} -> {b})", {"batch_size": b},
                         "more examples per step use the idle memory and speed up each epoch"))
    truncated = (data_report or {}).get("truncated") or 0
    if truncated:
        fixes.append(Fix(f"Longer sequences ({s.max_seq_len} -> {2 * s.max_seq_len} tokens)",
                         {"max_seq_len": 2 * s.max_seq_len},
                         f"{truncated} examples were cut at {s.max_seq_len} tokens; the memory is there to keep them whole"))
    step = int(summary.get("global_step") or 0)
    return [Finding("underused", "info", step,
                    f"The run peaked at {peak_mb / 1024:.1f} GiB, {100 * share:.0f}% of {ref_name} "
                    f"({ref_mb / 1024:.1f} GiB): a larger batch or longer sequences would fit.",
                    fixes, {"peak_mb": peak_mb, "reference_mb": ref_mb, "reference": ref_name, "share": share})]


def _left_out(lines: list[int]) -> str:
    """The end of the truncation finding: the examples whose whole answer was cut off (not trained on)."""
    if not lines:
        return "."
    return f"; {len(lines)} of them lost their whole answer and were left out of training ({lines_text(lines)})."


def data_findings(report: dict | None, config: dict | None = None) -> list[Finding]:
    """Data problems found before training, from a data report (`DataReport.to_dict()`).

    Duplicates are a warning from 10% of the usable rows (they over-weight some rows and leak into the
    eval split), conflicting answers, empty answers and truncation from 5%; fewer are notes.
    """
    if not report:
        return []
    s = _Settings(config)
    q = report.get("quality") or {}
    usable = max(1, int(report.get("usable") or 0))
    rows = max(usable, int(report.get("rows") or 0))
    path = report.get("path") or "the data"
    out = []

    def sev(n: int, of: int, share: float) -> str:
        return "warning" if n >= share * of else "info"

    dup = int(q.get("duplicates") or 0)
    if dup:
        out.append(Finding("data", sev(dup, usable, DUPLICATE_WARN_SHARE), 0,
                           f"{dup} of {usable} usable rows in {path} are exact duplicates of an earlier row.",
                           [Fix("Remove the duplicate rows", {}, "repeats count extra in training and can land in the "
                                "eval split too, making eval loss look better than it is")],
                           {"duplicates": dup, "lines": (q.get("examples") or {}).get("duplicates", [])}))
    conflicts = int(q.get("conflicting_prompts") or 0)
    if conflicts:
        n_rows = int(q.get("conflicting_rows") or 0)
        out.append(Finding("data", sev(n_rows, usable, DATA_WARN_SHARE), 0,
                           f"{conflicts} prompts appear with different answers ({n_rows} rows) in {path}.",
                           [Fix("Make the answers agree", {}, "the same question with different answers sends "
                                "conflicting signals; keep one answer per prompt unless variety is the point")],
                           {"conflicting_prompts": conflicts, "conflicting_rows": n_rows,
                            "lines": (q.get("examples") or {}).get("conflicting", [])}))
    empty = int(q.get("empty_answers") or 0)
    if empty:
        out.append(Finding("data", "warning", 0,
                           f"{empty} rows in {path} have an empty answer and were left out of training.",
                           [Fix("Fill in or remove the empty answers", {}, "a row without an answer has nothing to learn")],
                           {"empty_answers": empty, "lines": (q.get("examples") or {}).get("empty_answers", [])}))
    truncated = int(report.get("truncated") or 0)
    if truncated:
        lengths = report.get("token_lengths") or {}
        n = min(8192, 2 * s.max_seq_len)
        out.append(Finding("data", sev(truncated, usable, DATA_WARN_SHARE), 0,
                           f"{truncated} of {usable} examples are longer than {s.max_seq_len} tokens and were cut; "
                           "their answers lose their end" + _left_out(report.get("answer_cut_off") or []),
                           [Fix(f"Raise the sequence length ({s.max_seq_len} -> {n} tokens)", {"max_seq_len": n},
                                "whole examples teach whole answers; it costs activation memory", 0),
                            Fix("Shorten the longest examples", {}, "or split them into several rows")],
                           {"truncated": truncated, "token_lengths": lengths,
                            "answer_cut_off": report.get("answer_cut_off") or []}))
    skipped = rows - usable - empty
    if skipped > 0:
        out.append(Finding("data", sev(skipped, rows, DATA_WARN_SHARE), 0,
                           f"{skipped} of {rows} rows in {path} could not be used (see `qlora-studio data check`).",
                           [Fix("Fix the rows listed by data check", {}, "")], {"skipped": skipped}))
    return out
