"""The GPU check's plan, time budget and step runner: pure functions, no torch (gpu_check.py runs them).

`build_plan` lists every step with its configurations and estimated seconds; `project` says what a
budget allows if the estimates hold; `Budget` and `run_step` / `run_items` decide at run time, from
the clock, whether a step or configuration still fits, and record why not when it does not.
Estimates come from COST, a rough model of an H200-class GPU; the report puts each next to the time
actually taken, so the constants can be corrected after a run.
"""

from __future__ import annotations

import importlib.util
import time
import traceback
from pathlib import Path

import vram_accuracy as va
from qlora_studio.catalog import load_architecture
from qlora_studio.estimator import GiB

STEPS = {
    "vram": ("memory estimate vs measured peak", False),
    "throughput": ("usual recipe vs our trainer: non-pad tokens/s, ratio, MFU", False),
    "oom": ("forced out of memory: automatic retry, memory back to baseline", False),
    "fp16": ("fp16 compute run: losses stay finite", False),
    "kernels": ("SDPA / eager / flash-attention-2 / torch.compile / Liger", True),
}
# Rough cost model of an H200-class GPU on a fast local disk (seconds; GB/s; TFLOP/s reached by a 4-bit step).
COST = dict(startup_s=25.0, write_fixed_s=4.0, write_gb_s=1.5, load_fixed_s=4.0, load_gb_s=2.0, tokenizer_s=15.0,
            run_fixed_s=12.0, step_fixed_s=0.2, tflops=200.0, compile_s=60.0)
# Step 1 runs these models first (each is written once; its cases run back to back): the cases a cut
# budget keeps cover 0.5B-14B, NF4/FP4/none, checkpointing on/off, seq 512-4096 and fp16 compute.
MODEL_ORDER = ["Qwen2.5-0.5B", "Llama-3.1-8B", "Qwen2.5-14B", "Llama-3.2-3B", "Llama-3.2-1B", "Qwen2.5-1.5B",
               "Qwen2.5-7B", "Gemma-2-2B", "Phi-3.5-mini", "Qwen2.5-3B", "Mistral-7B-v0.3"]
KERNEL_VARIANTS = [  # (name, attention, package needed, compile)
    ("sdpa", "sdpa", None, False), ("eager", "eager", None, False),
    ("flash_attention_2", "flash_attention_2", "flash_attn", False),
    ("torch.compile", "sdpa", None, True), ("liger", "sdpa", "liger_kernel", False),  # liger last: it patches globally
]


# ------------------------------------------------------------------ cost model and plan (pure)


def matmul_params(name: str) -> int:
    """Weights that take part in a matmul: the decoder's linear layers and the lm_head."""
    arch = load_architecture(name)
    return arch.param_counts().quantizable + arch.vocab_size * arch.hidden_size


def write_s(name: str) -> float:
    return COST["write_fixed_s"] + 2 * load_architecture(name).total_params / (COST["write_gb_s"] * 1e9)


def load_s(name: str) -> float:
    return COST["load_fixed_s"] + 2 * load_architecture(name).total_params / (COST["load_gb_s"] * 1e9)


def step_s(name: str, tokens: int, checkpointing: bool = True) -> float:
    """One optimizer step: forward + backward (+ the recomputed forward with checkpointing)."""
    return COST["step_fixed_s"] + (8 if checkpointing else 6) * matmul_params(name) * tokens / (COST["tflops"] * 1e12)


def ordered_cases() -> list:
    rank = {m: i for i, m in enumerate(MODEL_ORDER)}
    return sorted(va.CASES, key=lambda c: rank.get(c.model, len(rank)))  # stable: vram_accuracy's order within a model


def case_seconds(case, steps: int, written: bool) -> float:
    run = load_s(case.model) + (steps + 1) * step_s(case.model, case.batch * case.seq, case.checkpointing) + 1.0
    return run + (0.0 if written else write_s(case.model))


def available(package: str | None) -> bool:
    return package is None or importlib.util.find_spec(package) is not None


def build_plan(args, keys=None, ready=(), tokenizer_ready: bool = False) -> dict:
    """Every step to run with its configurations and estimated seconds. ``ready``: models already on
    disk; a model step 1 writes and keeps (``--tp-model``, ``--small-model``) counts as ready after it."""
    keys = [k for k in STEPS if k in (keys or args.steps)]
    keep = {args.tp_model, args.small_model}
    have = set(ready)
    steps = []

    def prep(name: str) -> float:
        nonlocal tokenizer_ready
        s = (0.0 if name in have else write_s(name)) + (0.0 if tokenizer_ready else COST["tokenizer_s"])
        have.add(name)
        tokenizer_ready = True
        return s

    def add(key, configs, estimate_s, min_s=None, **extra):
        title, optional = STEPS[key]
        steps.append(dict(key=key, title=title, optional=optional, estimate_s=round(estimate_s, 1),
                          min_s=round(min_s if min_s is not None else estimate_s, 1), configs=configs, **extra))

    if "vram" in keys:
        configs, written = [], set(have)
        for case in ordered_cases():
            e = va.estimate_case(case)
            s = case_seconds(case, args.vram_steps, case.model in written)
            written.add(case.model)
            configs.append({"label": case.label, "estimate_gib": round(e.total_bytes / GiB, 2),
                            "allocator_view_gib": round(va.allocator_view(e, case.optimizer) / GiB, 2),
                            "estimate_s": round(s, 1)})
        have |= written & keep
        add("vram", configs, sum(c["estimate_s"] for c in configs), configs[0]["estimate_s"], steps_per_case=args.vram_steps)
    if "throughput" in keys:
        first = prep(args.tp_model)
        run = load_s(args.tp_model) + COST["run_fixed_s"] + args.tp_steps * step_s(args.tp_model, args.tp_batch * args.tp_seq // 2)
        configs = [{"label": f"reference: the usual recipe (throughput.py), {args.tp_model}, batch {args.tp_batch} x "
                             f"{args.tp_seq}, {args.tp_steps} steps", "estimate_s": round(first + run, 1)},
                   {"label": "ours: run_training as shipped, same model, data, LoRA and batch", "estimate_s": round(run, 1)}]
        add("throughput", configs, first + 2 * run)
    small = args.small_model
    if "oom" in keys:
        first = prep(small)
        s = first + 3 * (load_s(small) + COST["run_fixed_s"]) + 12 * step_s(small, 4 * args.oom_seq)
        add("oom", [{"label": f"{small} nf4 r16/all, micro-batch 16 x {args.oom_seq} under a cap of {args.oom_cap_factor:g} x the "
                              "estimate for 4; expected 16 -> 8 -> 4, 3 optimizer steps", "estimate_s": round(s, 1)}], s)
    if "fp16" in keys:
        first = prep(small)
        s = first + load_s(small) + COST["run_fixed_s"] + args.fp16_steps * step_s(small, 4 * 256)
        add("fp16", [{"label": f"{small} nf4 with fp16 compute forced (its plan), batch 4 x 512, "
                               f"{args.fp16_steps} steps", "estimate_s": round(s, 1)}], s)
    if "kernels" in keys:
        first = prep(args.tp_model)
        configs = []
        for name, _, package, compiled in KERNEL_VARIANTS:
            s = load_s(args.tp_model) + 8 * step_s(args.tp_model, args.tp_batch * 1024) + (COST["compile_s"] if compiled else 0)
            note = "" if available(package) else f" ({package} not installed here: skipped unless it is there)"
            configs.append({"label": f"{name}: {args.tp_model} nf4 r16/all, batch {args.tp_batch} x 1024, 3 warm-up + 5 "
                                     f"timed steps{note}", "estimate_s": round(s + (first if not configs else 0), 1)})
        add("kernels", configs, sum(c["estimate_s"] for c in configs), configs[0]["estimate_s"])
    return {"budget_s": args.budget_s, "startup_s": COST["startup_s"], "cost_model": dict(COST), "steps": steps,
            "estimate_s": round(COST["startup_s"] + sum(s["estimate_s"] for s in steps), 1)}


def project(plan: dict) -> list[dict]:
    """What the budget allows if the estimates hold: per step, how many configurations run."""
    t, out, steps = plan["startup_s"], [], plan["steps"]
    for i, s in enumerate(steps):
        reserve = sum(x["estimate_s"] for x in steps[i + 1:] if not x["optional"])
        free = plan["budget_s"] - t - reserve
        if free < s["min_s"]:
            out.append({"key": s["key"], "runs": 0, "of": len(s["configs"]), "start_s": round(t)})
            continue
        n, used = 0, 0.0
        if s["min_s"] < s["estimate_s"]:  # runs configuration by configuration
            for c in s["configs"]:
                if used + c["estimate_s"] <= free:
                    used += c["estimate_s"]
                    n += 1
        else:
            n, used = len(s["configs"]), s["estimate_s"]
        out.append({"key": s["key"], "runs": n, "of": len(s["configs"]), "start_s": round(t)})
        t += used
    return out


def format_plan(plan: dict, out: Path) -> str:
    lines = [f"GPU check plan (dry run: nothing runs). Estimates: a rough cost model of an H200-class GPU {plan['cost_model']}",
             f"budget {plan['budget_s']:.0f} s (--budget-s), startup ~{plan['startup_s']:.0f} s; a step (or configuration) "
             "is skipped, with the reason recorded, when the time left minus what the later required steps need is below "
             "its estimate", f"report: {out / 'gpu_check.json'} and {out / 'gpu_check.md'}, rewritten after every step", ""]
    projected = {p["key"]: p for p in project(plan)}
    for i, s in enumerate(plan["steps"], 1):
        p = projected[s["key"]]
        lines.append(f"step {i} {s['key']}{' (optional)' if s['optional'] else ''}: {s['title']} -- "
                     f"{len(s['configs'])} configuration(s), ~{s['estimate_s']:.0f} s; projected to run "
                     f"{p['runs']} of {p['of']} starting at ~{p['start_s']} s")
        for j, c in enumerate(s["configs"], 1):
            mem = f"  est {c['estimate_gib']:.2f} GiB (allocator view {c['allocator_view_gib']:.2f})" if "estimate_gib" in c else ""
            lines.append(f"    {j:2d}. {c['label']}{mem}  ~{c['estimate_s']:.0f} s")
    lines.append(f"\ntotal estimate {plan['estimate_s']:.0f} s for a budget of {plan['budget_s']:.0f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------ budget and step runner (pure)


class Budget:
    def __init__(self, total_s: float, clock=time.monotonic):
        self.total, self.clock, self.start = float(total_s), clock, clock()

    def remaining(self) -> float:
        return self.total - (self.clock() - self.start)

    def check(self, need_s: float, reserve_s: float = 0.0) -> str | None:
        """None when ``need_s`` fits in what is left after ``reserve_s``; otherwise why not."""
        left = self.remaining()
        if left - reserve_s >= need_s:
            return None
        kept = f", {reserve_s:.0f} s of it kept for the later steps" if reserve_s else ""
        return f"needs about {need_s:.0f} s; {max(0.0, left):.0f} s of the {self.total:.0f} s budget left{kept}"


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


def run_step(steps: dict, key: str, fn, budget: Budget, need_s: float, reserve_s: float, save, estimate_s=None) -> dict:
    """Run ``fn(record)`` as step ``key`` unless the budget says no; an exception is recorded, not raised.
    Status: ok, failed (a check in ``checks`` is False), error, skipped."""
    rec = steps[key] = {"status": "running", "estimate_s": round(estimate_s if estimate_s is not None else need_s, 1)}
    reason = budget.check(need_s, reserve_s)
    if reason:
        rec.update(status="skipped", reason=reason)
        save()
        return rec
    save()
    started = budget.clock()
    try:
        rec.update(fn(rec) or {})
        if rec["status"] == "running":
            rec["status"] = "failed" if any(v is False for v in (rec.get("checks") or {}).values()) else "ok"
    except (Exception, SystemExit) as e:  # throughput.py's runs raise SystemExit when a run fails
        rec.update(status="error", error=_error_text(e), traceback=traceback.format_exc()[-6000:])
    rec["seconds"] = round(budget.clock() - started, 1)
    save()
    return rec


def run_items(items, budget: Budget, reserve_s: float, estimate, run_one, on_result) -> None:
    """Configuration by configuration: each runs if the budget allows, else is recorded as skipped."""
    for item in items:
        need = estimate(item)
        reason = budget.check(need, reserve_s)
        if reason:
            result = {"skipped": reason}
        else:
            started = budget.clock()
            try:
                result = run_one(item)
            except (Exception, SystemExit) as e:
                result = {"error": _error_text(e)}
            result["seconds"] = round(budget.clock() - started, 1)
        result["estimate_s"] = round(need, 1)
        on_result(item, result)
