"""One prepared GPU check: everything the project wants measured on a CUDA GPU, in one short run.

    python benchmarks/gpu_check.py --dry-run             # the plan: steps, configurations, estimates, budget
    python benchmarks/gpu_check.py                       # run it (CUDA only) -> artifacts/gpu_check/
    python benchmarks/gpu_check.py --budget-s 300 --steps vram,oom --out /tmp/r
    bash benchmarks/gpu_check.sh                         # on a GPU machine: carried wheels, nvidia-smi, log

Steps (in this order; each wrapped: a failing step records its error and the others still run):
  1 vram        memory estimate vs torch.cuda.max_memory_reserved / max_memory_allocated (and NVML when
                pynvml is there) for vram_accuracy.py's configurations, measured by its own `run_case`
  2 throughput  throughput.py's usual recipe and our trainer (`run_training`) on the same data and model:
                non-pad tokens/s, the ratio, MFU (formulas in gpu_check_report.flops_per_token)
  3 oom         a run through `run_training` whose micro-batch cannot fit under a memory cap
                (torch.cuda.set_per_process_memory_fraction): the automatic retry must complete and
                torch.cuda.memory_allocated must come back to where it was before the run
  4 fp16        a short run with fp16 compute (what a Turing card gets): every loss must be finite
  5 kernels     optional: SDPA vs eager vs flash-attention-2, torch.compile, Liger kernels (a package
                that is not installed is skipped)

Time: ``--budget-s`` (default 480) counts from the start of the script. Before a step (and before each
configuration of steps 1, 2 and 5) the time left, less what the later required steps are estimated to
need, must cover its estimate; otherwise it is skipped and the reason recorded. Estimates come from a
rough cost model of an H200-class GPU (COST); the report shows each estimate next to the time taken.

Models are built from catalog configs with random weights (memory and speed do not depend on the
values), written to ``--tmp`` (/dev/shm when it has room), with the embedded model's tokenizer where a
trainer needs one. Nothing is downloaded. The report (``--out``: gpu_check.json and gpu_check.md) is
rewritten after every step and every configuration, so a run cut short still leaves one.
Without CUDA (and without --dry-run) the script says so in one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))  # this checkout's qlora_studio

import gpu_check_report as report  # noqa: E402
import throughput as tp  # noqa: E402
import vram_accuracy as va  # noqa: E402
from gpu_check_plan import (COST, KERNEL_VARIANTS, STEPS, Budget, available, build_plan, case_seconds,  # noqa: E402
                            format_plan, load_s, matmul_params, ordered_cases, run_items, run_step, step_s,
                            write_s)
from qlora_studio.catalog import load_architecture  # noqa: E402
from qlora_studio.estimator import GiB, estimate, lora_params  # noqa: E402

OOM_TOLERANCE = 128 * 2**20  # torch.cuda.memory_allocated that may stay after a run (cuBLAS workspaces); a leak is GiBs


# ------------------------------------------------------------------ on the GPU


class ModelFolders:
    """Random-weight checkpoints under ``root``, written once; ``keep`` survives `release`."""

    def __init__(self, root: Path, keep: set):
        self.root, self.keep, self.tokenizer_ready = root, keep, False

    def ready(self) -> set:
        return {p.name for p in self.root.iterdir() if (p / ".complete").exists()} if self.root.exists() else set()

    def get(self, name: str, tokenizer: bool = False) -> Path:
        folder = self.root / name
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            va.write_random_checkpoint(load_architecture(name), folder)
            (folder / ".complete").touch()
        if tokenizer and not (folder / "tokenizer_config.json").exists():
            from qlora_studio.models import embedded_model_path
            from qlora_studio.loading import load_tokenizer

            load_tokenizer(embedded_model_path()).save_pretrained(folder)  # its ids fit every catalog vocabulary
            self.tokenizer_ready = True
        return folder

    def release(self, name: str) -> None:
        if name not in self.keep:
            shutil.rmtree(self.root / name, ignore_errors=True)


def free_cuda() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def step_vram(ctx, rec: dict) -> dict:
    import torch

    native = va.compute_dtype_name()
    cases, rec["cases"] = ordered_cases(), []
    last = {c.model: c for c in cases}
    print(va.HEADER, flush=True)

    def run_one(case) -> dict:
        folder = ctx.folders.get(case.model)
        try:
            return va.run_case(case, folder, ctx.args.vram_steps, ctx.nvml_baseline)
        except torch.cuda.OutOfMemoryError:
            return {"oom": True}

    def on_result(case, result: dict) -> None:
        free_cuda()
        e = va.estimate_case(case, native)
        view = va.allocator_view(e, case.optimizer)
        rec["cases"].append({"label": case.label, "case": asdict(case), "estimate_total": e.total_bytes,
                             "estimate_allocator_view": view, "estimate_breakdown": e.breakdown, **result})
        note = " OOM" if result.get("oom") else (" skipped" if result.get("skipped") else (" ERROR" if result.get("error") else ""))
        va.print_row(case.label + note, e, view, result)
        if case is last[case.model]:
            ctx.folders.release(case.model)
        ctx.save()

    run_items(cases, ctx.budget, ctx.reserve,
              lambda c: case_seconds(c, ctx.args.vram_steps, c.model in ctx.folders.ready()), run_one, on_result)
    return {"note": tally(rec["cases"], "configurations")}


def tally(results: list[dict], what: str) -> str:
    kinds = {"skipped": "skipped", "oom": "out of memory", "error": "failed"}
    counts = {label: sum(1 for r in results if r.get(key)) for key, label in kinds.items()}
    done = len(results) - sum(counts.values())
    return f"{done} of {len(results)} {what} measured" + "".join(f", {n} {label}" for label, n in counts.items() if n)


def step_throughput(ctx, rec: dict) -> dict:
    a = ctx.args
    ns = argparse.Namespace(batch_size=a.tp_batch, max_seq_len=a.tp_seq, warmup=a.tp_warmup)
    folder = ctx.folders.get(a.tp_model, tokenizer=True)
    data = ctx.work / "throughput.jsonl"
    shape = tp.make_data(data, a.tp_steps * a.tp_batch, max_words=a.tp_seq)
    arch = load_architecture(a.tp_model)
    rec.update(model=a.tp_model, batch=a.tp_batch, seq=a.tp_seq, steps=a.tp_steps, warmup=a.tp_warmup, data=shape,
               peak_tflops=ctx.peak, peak_source=ctx.peak_source, runs={},
               flops_per_token=report.flops_per_token(matmul_params(a.tp_model), lora_params(arch, tp.LORA["r"], "all")))
    run = load_s(a.tp_model) + COST["run_fixed_s"] + a.tp_steps * step_s(a.tp_model, a.tp_batch * a.tp_seq // 2)

    def run_one(name: str) -> dict:
        free_cuda()
        return tp.run_reference(ns, data, folder) if name == "reference" else tp.run_ours(ns, data, folder, {})

    def on_result(name: str, result: dict) -> None:
        free_cuda()
        rec["runs"][name] = result
        print(f"throughput {name}: {json.dumps(result)}", flush=True)
        ctx.save()

    run_items(["reference", "ours"], ctx.budget, ctx.reserve, lambda _: run, run_one, on_result)
    ran = lambda r: None if r.get("skipped") else not r.get("error")  # noqa: E731
    return {"checks": {f"{name} run completed": ran(r) for name, r in rec["runs"].items()},
            "note": tally(list(rec["runs"].values()), "runs")}


def write_long_rows(path: Path, rows: int, words: int) -> Path:
    """Rows of ``words`` words each (more tokens than ``words``): every batch is full width."""
    vocab = tp.corpus_words()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            start = (i * 997) % (len(vocab) - words)
            f.write(json.dumps({"text": " ".join(vocab[start:start + words])}) + "\n")
    return path


def step_oom(ctx, rec: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    from qlora_studio.config import TrainConfig
    from qlora_studio.training import prepare_run, run_training

    a, name = ctx.args, ctx.args.small_model
    folder = ctx.folders.get(name, tokenizer=True)
    data = write_long_rows(ctx.work / "oom.jsonl", 64, a.oom_seq)
    est = estimate(load_architecture(name), quant="nf4", rank=16, targets="all", batch=4, seq=a.oom_seq,
                   optimizer="paged_adamw_8bit", compute_dtype=va.compute_dtype_name())
    free_cuda()
    before = {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved()}
    total = torch.cuda.get_device_properties(0).total_memory
    cap = before["reserved"] + int(a.oom_cap_factor * va.allocator_view(est, "paged_adamw_8bit"))
    begins = []

    class Watch(TrainerCallback):  # memory when each attempt starts training (its model loaded)
        def on_train_begin(self, args, state, control, **kw):
            begins.append(torch.cuda.memory_allocated())

    cfg = TrainConfig(model=str(folder), data=str(data), data_format="text", quant="nf4", rank=16, targets="all",
                      batch_size=16, max_seq_len=a.oom_seq, max_steps=3, eval_fraction=0.0, save_steps=10**9,
                      batching="padded", gradient_checkpointing=True, oom_retries=3)
    run = prepare_run(cfg, name=f"gpu-check-oom-{int(time.time())}")
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), 0)
    try:
        status = run_training(run, extra_callbacks=[Watch()])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    after_return = torch.cuda.memory_allocated()
    free_cuda()
    after = {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved()}
    recoveries = status.get("recoveries") or []
    return {"checks": {
                "run completed": status.get("state") == "completed",
                "recovered from at least one out-of-memory": len(recoveries) >= 1,
                "memory_allocated back to baseline (after gc)": after["allocated"] - before["allocated"] <= OOM_TOLERANCE,
                "each retry started with the memory of the first attempt":
                    all(b - begins[0] <= OOM_TOLERANCE for b in begins[1:]) if len(begins) > 1 else None},
            "facts": {"state": status.get("state"), "error": status.get("error"), "cap_gib": round(cap / GiB, 2),
                      "micro-batches": [r["batch_size"] for r in recoveries],
                      "allocated before / right after / after gc (MiB)":
                          f"{before['allocated'] / 2**20:.0f} / {after_return / 2**20:.0f} / {after['allocated'] / 2**20:.0f}",
                      "allocated at each attempt's start (MiB)": [round(b / 2**20) for b in begins],
                      "run": str(run.path)},
            "recoveries": recoveries}


def fp16_plan(cfg, machine=None):
    """The run's plan with fp16 compute, what a Turing card (compute capability 7.5) gets, on any card:
    the trainer executes whatever plan it is given (plan.json), so no code path is patched."""
    from qlora_studio.plan import plan_for

    plan = plan_for(cfg, machine)
    plan.precision = "fp16"
    plan.reasons["precision"] = "fp16 forced by gpu_check (what a compute capability 7.x card trains in)"
    return plan


def step_fp16(ctx, rec: dict) -> dict:
    from qlora_studio.config import TrainConfig
    from qlora_studio.runs import RunFolder
    from qlora_studio.training import prepare_run, run_training

    a = ctx.args
    folder = ctx.folders.get(a.small_model, tokenizer=True)
    data = ctx.work / "fp16.jsonl"
    tp.make_data(data, a.fp16_steps * 4, max_words=512, seed=1)
    cfg = TrainConfig(model=str(folder), data=str(data), data_format="text", quant="nf4", batch_size=4, max_seq_len=512,
                      max_steps=a.fp16_steps, eval_fraction=0.0, save_steps=10**9)
    run = prepare_run(cfg, name=f"gpu-check-fp16-{int(time.time())}", plan=fp16_plan(cfg))
    status = run_training(run)
    free_cuda()
    train = [r for r in RunFolder(run.path).metrics() if r.get("type") == "train"]
    losses = [r.get("loss") for r in train]
    finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
    dtype = (RunFolder(run.path).plan().get("plan") or {}).get("precision")
    return {"checks": {"run completed": status.get("state") == "completed", "compute dtype was fp16": dtype == "fp16",
                       "every loss finite": bool(losses) and all(finite(x) for x in losses)},
            "facts": {"state": status.get("state"), "error": status.get("error"), "steps logged": len(losses),
                      "losses": [round(x, 4) if finite(x) else str(x) for x in losses],
                      "steps the loss scaler skipped (non-finite grad norm)": sum(r.get("grad_norm") is not None and not finite(r["grad_norm"]) for r in train),
                      "run": str(run.path)}}


def step_rate(folder: Path, attention: str, batch: int, seq: int, compiled: bool, warmup: int = 3, steps: int = 5) -> dict:
    """Tokens/s of the training step alone (NF4, LoRA r16 on every linear layer, checkpointing)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qlora_studio.loading import linear_module_names, load_base_model

    dtype = torch.bfloat16 if va.compute_dtype_name() == "bf16" else torch.float16
    model = load_base_model(folder, "nf4", va.compute_dtype_name(), "cuda", attention=attention)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=linear_module_names(model)))
    optimizer = va.make_optimizer("paged_adamw_8bit", [p for p in model.parameters() if p.requires_grad])
    forward = torch.compile(model) if compiled else model
    ids = torch.randint(1, model.config.vocab_size, (batch, seq), device="cuda")
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"tokens_per_s": batch * seq * steps / seconds, "seconds_per_step": seconds / steps, "loss": float(loss)}


def step_kernels(ctx, rec: dict) -> dict:
    a = ctx.args
    arch = load_architecture(a.tp_model)
    rec["variants"] = []
    todo = [v for v in KERNEL_VARIANTS if available(v[2])]
    for name, _, package, _ in KERNEL_VARIANTS:
        if not available(package):
            rec["variants"].append({"name": name, "skipped": f"{package} is not installed"})

    def run_one(variant) -> dict:
        name, attention, package, compiled = variant
        folder = ctx.folders.get(a.tp_model, tokenizer=True)
        if package == "liger_kernel":
            import liger_kernel.transformers as liger

            getattr(liger, f"apply_liger_kernel_to_{arch.model_type}")()  # patches the modeling classes for good
        return step_rate(folder, attention, a.tp_batch, 1024, compiled)

    def on_result(variant, result: dict) -> None:
        free_cuda()
        rec["variants"].append({"name": variant[0], **result})
        print(f"kernels {variant[0]}: {json.dumps(result)}", flush=True)
        ctx.save()

    def estimate_one(variant) -> float:
        prep = 0.0 if a.tp_model in ctx.folders.ready() else write_s(a.tp_model) + COST["tokenizer_s"]
        return prep + load_s(a.tp_model) + 8 * step_s(a.tp_model, a.tp_batch * 1024) + (COST["compile_s"] if variant[3] else 0)

    run_items(todo, ctx.budget, 0.0, estimate_one, run_one, on_result)
    return {"note": tally(rec["variants"], "variants")}


# ------------------------------------------------------------------ driver


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "flash-attn", "liger-kernel", "nvidia-ml-py"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # not caught by the step runner: the run ends here


def copy_run_logs(runs: Path, dest: Path) -> None:
    """The product runs' logs and records (not their weights) next to the report."""
    for run in sorted(runs.iterdir()) if runs.is_dir() else []:
        for f in run.iterdir():
            if f.is_file() and f.suffix in (".log", ".json", ".jsonl"):
                (dest / run.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest / run.name / f.name)


def scratch_dir(requested: str | None, need_bytes: int) -> Path:
    if requested:
        return Path(requested)
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need_bytes:
        return shm
    return Path(tempfile.gettempdir())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "gpu_check", help="folder for gpu_check.json/.md")
    p.add_argument("--budget-s", type=float, default=480.0, help="time budget in seconds, from the script's start")
    p.add_argument("--steps", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=list(STEPS),
                   help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak for MFU (default: from a table)")
    p.add_argument("--vram-steps", type=int, default=3, help="optimizer steps per memory configuration")
    p.add_argument("--tp-model", default="Llama-3.2-3B", help="catalog model for the throughput and kernel steps")
    p.add_argument("--tp-steps", type=int, default=24)
    p.add_argument("--tp-warmup", type=int, default=2)
    p.add_argument("--tp-batch", type=int, default=4)
    p.add_argument("--tp-seq", type=int, default=512)
    p.add_argument("--small-model", default="Qwen2.5-0.5B", help="catalog model for the OOM and fp16 runs")
    p.add_argument("--oom-seq", type=int, default=1024)
    p.add_argument("--oom-cap-factor", type=float, default=1.3,
                   help="memory cap of the OOM run, as a multiple of the estimate for micro-batch 4 (it starts at 16)")
    p.add_argument("--fp16-steps", type=int, default=12)
    p.add_argument("--tmp", help="where the random checkpoints go (default /dev/shm when it has room)")
    a = p.parse_args(argv)
    unknown = [k for k in a.steps if k not in STEPS]
    if unknown:
        p.error(f"unknown step(s) {unknown}; choose from {','.join(STEPS)}")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    if args.dry_run:
        print(format_plan(build_plan(args), args.out))
        return 0
    try:
        import torch
    except ImportError:
        print("gpu_check: torch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU (torch.cuda.is_available() is False); run it on an NVIDIA GPU machine, "
              "or use --dry-run for the plan", file=sys.stderr)
        return 2
    nvml_baseline = va.nvml_used_bytes()  # before this process creates its CUDA context
    biggest = max(load_architecture(c.model).total_params for c in va.CASES) * 2
    work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=scratch_dir(args.tmp, int(biggest * 1.2) + 12 * GiB)))
    os.environ.update(QLORA_STUDIO_HOME=str(work / "home"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    gpu = torch.cuda.get_device_name(0)
    peak, peak_source = report.peak_tflops(gpu, args.peak_tflops)
    meta = {"tool": "benchmarks/gpu_check.py", "started_at": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": sys.argv[1:],
            "budget_s": args.budget_s, "gpu": gpu, "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / GiB, 1),
            "native_compute": va.compute_dtype_name(), "cuda": torch.version.cuda, "peak_tflops": peak,
            "peak_source": peak_source, "versions": versions(), "scratch": str(work), "nvml": nvml_baseline is not None}
    steps: dict = {}
    state = {"plan": build_plan(args)}

    def save(finished: bool = False) -> None:
        report.write_reports(args.out, report.build_report(meta, state["plan"], steps, finished, budget.clock() - budget.start))

    ctx = argparse.Namespace(args=args, budget=budget, save=save, work=work, peak=peak, peak_source=peak_source,
                             nvml_baseline=nvml_baseline, reserve=0.0,
                             folders=ModelFolders(work / "models", {args.tp_model, args.small_model}))
    print(f"gpu_check: {gpu}, budget {args.budget_s:.0f} s, scratch {work}, report in {args.out}", flush=True)
    funcs = {"vram": step_vram, "throughput": step_throughput, "oom": step_oom, "fp16": step_fp16, "kernels": step_kernels}
    signal.signal(signal.SIGTERM, _interrupt)  # a `timeout` still leaves the report and removes the scratch folder
    finished = False
    try:
        keys = [s["key"] for s in state["plan"]["steps"]]
        for i, key in enumerate(keys):
            now = build_plan(args, keys[i:], ctx.folders.ready(), ctx.folders.tokenizer_ready)["steps"]
            ctx.reserve = sum(s["estimate_s"] for s in now[1:] if not s["optional"])
            print(f"\n== step {key}: {STEPS[key][0]} (~{now[0]['estimate_s']:.0f} s, {budget.remaining():.0f} s left)", flush=True)
            rec = run_step(steps, key, lambda r, f=funcs[key]: f(ctx, r), budget, now[0]["min_s"], ctx.reserve, save,
                           now[0]["estimate_s"])
            print(f"== step {key}: {rec['status']} {rec.get('reason') or rec.get('error') or ''}", flush=True)
            free_cuda()
        finished = True
    finally:
        for rec in steps.values():
            if rec["status"] == "running":
                rec["status"] = "interrupted"
        save(finished)
        copy_run_logs(work / "home" / "runs", args.out / "runs")
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + report.render_markdown(report.build_report(meta, state["plan"], steps, True, budget.clock() - budget.start)))
    return 1 if any(s["status"] in ("failed", "error") for s in steps.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
