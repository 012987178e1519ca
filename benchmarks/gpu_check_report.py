"""The GPU check's report: figures computed from recorded step results, written as JSON and Markdown.

Pure functions (no torch, no GPU): `build_report` turns the recorded steps into a report with its
summary (median |error| and worst under-estimate of the memory estimate, tokens/s ratio, MFU, the
OOM-retry and fp16 verdicts); `render_markdown` prints it; `write_reports` writes both files
atomically, so a run cut short still leaves the last complete report.

Error convention (as in vram_accuracy.py): error = (estimate - measured) / measured; negative is an
under-estimate (the dangerous side: a plan that says "fits" and then runs out of memory).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

GiB = 2**30

# Dense bf16/fp16 tensor-core peak (TFLOP/s, no sparsity) by GPU name; the first matching entry wins,
# so the more specific names come first. GeForce cards: the fp32-accumulate rate (what autocast uses).
PEAK_TFLOPS = (
    ("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("A6000", 155.0), ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0), ("RTX 4090", 165.0),
    ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0),
)


def peak_tflops(gpu_name: str, override: float | None = None) -> tuple[float | None, str]:
    """(peak dense bf16 TFLOP/s, where the figure comes from) for a GPU name."""
    if override:
        return float(override), "--peak-tflops"
    for key, value in PEAK_TFLOPS:
        if key.lower() in (gpu_name or "").lower():
            return value, f"table entry {key!r}"
    return None, f"no table entry for {gpu_name!r}: pass --peak-tflops"


def flops_per_token(matmul_params: int, lora_params: int) -> dict:
    """Model FLOPs per trained token.

    ``6N``: the usual 6 x N (2 forward + 4 backward per weight), N = the weights that take part in a
    matmul (decoder linears + lm_head); comparable with published MFU figures, although a frozen base
    needs no weight gradients. ``frozen_base``: 4 x N (forward + gradient to the activations) + 6 x
    the LoRA parameters: what a LoRA step has to compute. Neither counts attention scores nor the
    recomputation of gradient checkpointing (hardware FLOPs, not model FLOPs)."""
    return {"6N": 6 * matmul_params, "frozen_base": 4 * matmul_params + 6 * lora_params,
            "matmul_params": matmul_params, "lora_params": lora_params}


def mfu(tokens_per_s: float | None, flops: float | None, peak: float | None) -> float | None:
    if not tokens_per_s or not flops or not peak:
        return None
    return tokens_per_s * flops / (peak * 1e12)


def error(estimated: float | None, measured: float | None) -> float | None:
    return None if not measured or estimated is None else (estimated - measured) / measured


def error_stats(rows: list[dict], estimate_key: str, measured_key: str) -> dict | None:
    """median |error|, the worst under-estimate (None when every estimate is at or above its
    measurement), the lowest error and how many are more than 10% under, over the measured rows."""
    pairs = [(r["label"], error(r.get(estimate_key), r.get(measured_key))) for r in rows]
    pairs = [(label, e) for label, e in pairs if e is not None]
    if not pairs:
        return None
    errs = [e for _, e in pairs]
    low_label, low = min(pairs, key=lambda p: p[1])
    return {"n": len(errs), "median_abs_error": statistics.median(abs(e) for e in errs),
            "worst_under_estimate": low if low < 0 else None, "worst_under_label": low_label if low < 0 else None,
            "lowest_error": low, "more_than_10pct_under": sum(e < -0.10 for e in errs)}


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r.get("skipped") and not r.get("oom") and not r.get("error")]


def summarize(steps: dict) -> dict:
    """The headline figures of each step that has data."""
    out: dict = {}
    vram = steps.get("vram") or {}
    rows = vram.get("cases") or []
    if rows:
        measured = _measured(rows)
        out["vram"] = {
            "configurations": len(rows), "measured": len(measured),
            "skipped": sum(1 for r in rows if r.get("skipped")), "oom": sum(1 for r in rows if r.get("oom")),
            "errors": sum(1 for r in rows if r.get("error")),
            "vs_max_reserved": error_stats(measured, "estimate_allocator_view", "max_reserved"),
            "vs_max_allocated": error_stats(measured, "estimate_allocator_view", "max_allocated"),
            "vs_nvml": error_stats(measured, "estimate_total", "nvml_used"),
        }
    tp = steps.get("throughput") or {}
    if tp.get("runs"):
        flops, peak = tp.get("flops_per_token") or {}, tp.get("peak_tflops")
        ref = (tp["runs"].get("reference") or {}).get("tokens_per_s")
        table = {}
        for name, r in tp["runs"].items():
            rate = r.get("tokens_per_s")
            table[name] = {"tokens_per_s": rate, "ratio": rate / ref if rate and ref else None,
                           "mfu_6N": mfu(rate, flops.get("6N"), peak),
                           "mfu_frozen_base": mfu(rate, flops.get("frozen_base"), peak),
                           "skipped": r.get("skipped"), "error": r.get("error")}
        out["throughput"] = table
    for key in ("oom", "fp16"):
        s = steps.get(key) or {}
        if s.get("checks"):
            out[key] = {"passed": all(v for v in s["checks"].values() if v is not None), "checks": s["checks"]}
    k = steps.get("kernels") or {}
    if k.get("variants"):
        base = next((v.get("tokens_per_s") for v in k["variants"] if v.get("name") == "sdpa"), None)
        out["kernels"] = [{"name": v["name"], "tokens_per_s": v.get("tokens_per_s"),
                           "vs_sdpa": v["tokens_per_s"] / base if v.get("tokens_per_s") and base else None,
                           "skipped": v.get("skipped"), "error": v.get("error")} for v in k["variants"]]
    return out


def build_report(meta: dict, plan: dict, steps: dict, finished: bool, elapsed_s: float) -> dict:
    return {"schema": 1, "finished": finished, "elapsed_s": round(elapsed_s, 1), "meta": meta, "plan": plan,
            "steps": steps, "summary": summarize(steps)}


# ------------------------------------------------------------------ Markdown


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def _num(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def _stats_line(name: str, s: dict | None) -> str:
    if not s:
        return f"- vs {name}: no measurements"
    worst = (f"worst under-estimate {s['worst_under_estimate']:+.1%} ({s['worst_under_label']})"
             if s["worst_under_estimate"] is not None
             else f"no under-estimate (lowest error {s['lowest_error']:+.1%})")
    return (f"- vs {name}: median |error| {s['median_abs_error']:.1%} over {s['n']}; {worst}; "
            f"{s['more_than_10pct_under']} more than 10% under")


def _step_line(key: str, s: dict) -> str:
    status = s.get("status", "?")
    why = s.get("reason") or s.get("error") or s.get("note") or ""
    took = f"{s['seconds']:.0f} s" if s.get("seconds") is not None else "-"
    return f"| {key} | {status} | {took} | {_num(s.get('estimate_s'))} s | {why} |"


def render_markdown(report: dict) -> str:
    meta, steps, summ = report.get("meta", {}), report.get("steps", {}), report.get("summary", {})
    L = ["# GPU check", "",
         f"GPU: {meta.get('gpu', '?')} · {'finished' if report.get('finished') else 'NOT FINISHED (cut short?)'} · "
         f"{report.get('elapsed_s', 0):.0f} s of a {meta.get('budget_s', '?')} s budget",
         "", "Versions: " + ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items()), "",
         "| step | status | took | estimate | note |", "|---|---|---|---|---|"]
    L += [_step_line(k, s) for k, s in steps.items()]

    rows = (steps.get("vram") or {}).get("cases") or []
    if rows:
        L += ["", "## 1. Memory estimate vs measured",
              "", "est* = the estimate without the CUDA context and paged optimizer states (what PyTorch's "
              "allocator sees); error = (estimate - measured) / measured, negative = under-estimate. GiB.", "",
              "| configuration | est | est* | max reserved | err | max allocated | err | NVML | err | s (est) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.get("skipped") or r.get("error"):
                L.append(f"| {r['label']} | {_gib(r.get('estimate_total'))} | {_gib(r.get('estimate_allocator_view'))} "
                         f"| {'skipped: ' + r['skipped'] if r.get('skipped') else 'error: ' + r['error']} "
                         f"| | | | | | - ({_num(r.get('estimate_s'))}) |")
                continue
            L.append(
                f"| {r['label']}{' **OOM**' if r.get('oom') else ''} | {_gib(r.get('estimate_total'))} | "
                f"{_gib(r.get('estimate_allocator_view'))} | {_gib(r.get('max_reserved'))} | "
                f"{_pct(error(r.get('estimate_allocator_view'), r.get('max_reserved')))} | {_gib(r.get('max_allocated'))} | "
                f"{_pct(error(r.get('estimate_allocator_view'), r.get('max_allocated')))} | {_gib(r.get('nvml_used'))} | "
                f"{_pct(error(r.get('estimate_total'), r.get('nvml_used')))} | "
                f"{_num(r.get('seconds'))} ({_num(r.get('estimate_s'))}) |")
        v = summ.get("vram") or {}
        L += ["", f"{v.get('measured', 0)} of {v.get('configurations', 0)} configurations measured "
                  f"({v.get('skipped', 0)} skipped, {v.get('oom', 0)} OOM, {v.get('errors', 0)} errors).",
              _stats_line("max_memory_reserved (est*)", v.get("vs_max_reserved")),
              _stats_line("max_memory_allocated (est*)", v.get("vs_max_allocated")),
              _stats_line("NVML device memory (whole estimate)", v.get("vs_nvml"))]

    tp = steps.get("throughput") or {}
    if summ.get("throughput"):
        f = tp.get("flops_per_token") or {}
        L += ["", "## 2. Throughput: the usual recipe vs our trainer",
              "", f"{tp.get('model')} (random weights), batch {tp.get('batch')}, seq {tp.get('seq')}, "
                  f"{tp.get('steps')} steps ({tp.get('warmup')} warm-up steps left out); peak "
                  f"{_num(tp.get('peak_tflops'))} TFLOP/s ({tp.get('peak_source')}).",
              f"MFU = non-pad tokens/s x FLOPs per token / peak. 6N: 6 x {_num(f.get('matmul_params'), ',')} "
              f"matmul weights; frozen base: 4 x N + 6 x {_num(f.get('lora_params'), ',')} LoRA params. "
              "Attention scores and checkpointing's recomputation are not counted.", "",
              "| run | non-pad tokens/s | ratio | MFU (6N) | MFU (frozen base) | note |", "|---|---|---|---|---|---|"]
        for name, r in summ["throughput"].items():
            note = r.get("skipped") or r.get("error") or ""
            L.append(f"| {name} | {_num(r['tokens_per_s'], '.1f')} | {_num(r['ratio'], '.2f')}x | "
                     f"{_pct(r['mfu_6N']).lstrip('+')} | {_pct(r['mfu_frozen_base']).lstrip('+')} | {note} |")

    for key, title in (("oom", "3. Forced out of memory: automatic retry"), ("fp16", "4. fp16 compute (Turing path)")):
        s = steps.get(key) or {}
        if s.get("checks"):
            L += ["", f"## {title}", "", f"**{'passed' if summ[key]['passed'] else 'FAILED'}**", ""]
            L += [f"- {name}: {'yes' if ok else ('-' if ok is None else 'NO')}" for name, ok in s["checks"].items()]
            L += [f"- {k}: {v}" for k, v in (s.get("facts") or {}).items()]

    if summ.get("kernels"):
        L += ["", "## 5. Kernels and attention", "", "| variant | tokens/s | vs sdpa | note |", "|---|---|---|---|"]
        for v in summ["kernels"]:
            L.append(f"| {v['name']} | {_num(v['tokens_per_s'], '.1f')} | {_num(v['vs_sdpa'], '.2f')} | "
                     f"{v.get('skipped') or v.get('error') or ''} |")
    return "\n".join(L) + "\n"


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_reports(out: Path, report: dict) -> tuple[Path, Path]:
    """gpu_check.json and gpu_check.md in ``out``, each replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "gpu_check.json", out / "gpu_check.md")
    texts = (json.dumps(_json_safe(report), indent=1, default=str), render_markdown(report))
    for path, text in zip(paths, texts):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return paths
