"""Estimator accuracy on a real GPU: estimate vs measured peak memory of a few real (Q)LoRA steps.

    python benchmarks/vram_accuracy.py                 # every configuration (about 10-15 min on an H100)
    python benchmarks/vram_accuracy.py --only 0.5B     # configurations whose label contains "0.5B"
    python benchmarks/vram_accuracy.py --list          # the configurations and their estimates; no GPU needed
    python benchmarks/vram_accuracy.py --out r.jsonl   # also write one JSON line per configuration
    python benchmarks/vram_accuracy.py --record        # also record each run in this machine's calibration file

Models are built from their catalog config with random weights (memory does not depend on the values)
on the GPU, saved to a temporary folder and loaded back through transformers with the same
BitsAndBytesConfig the studio uses, so the 4-bit path is the real one. Nothing is downloaded.

Each configuration runs ``--steps`` optimizer steps the way the Trainer does (autocast, loss from the
model, output dropped before backward, gradient checkpointing non-reentrant, PEFT LoRA, bitsandbytes
or torch AdamW), with padded batches (the estimator assumes every sequence padded to ``seq``).

Measured:
- ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the steps. They see only PyTorch's
  caching allocator, so they are compared with the estimate minus the CUDA context and minus the paged
  optimizer states (bitsandbytes keeps those in CUDA unified memory, outside the allocator).
- NVML's device memory in use at the end minus before CUDA started (what nvidia-smi shows: context +
  reserved + paged states), compared with the whole estimate.

Without CUDA the script says so in one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's qlora_studio

from qlora_studio.catalog import Architecture, load_architecture  # noqa: E402
from qlora_studio.estimator import CUDA_CONTEXT_BYTES, GiB, MemoryBreakdown, estimate  # noqa: E402


@dataclass(frozen=True)
class Case:
    model: str
    quant: str  # nf4, fp4, none
    rank: int
    targets: str  # attention, all
    batch: int
    seq: int
    checkpointing: bool
    optimizer: str = "paged_adamw_8bit"
    double_quant: bool = True
    attention: str = "sdpa"
    compute_dtype: str | None = None  # bf16 | fp16; None: the card's own (bf16 from compute capability 8.0)

    @property
    def label(self) -> str:
        quant = self.quant + ("+dq" if self.quant != "none" and self.double_quant else "")
        ckpt = "ckpt" if self.checkpointing else "no-ckpt"
        return (f"{self.model} {quant} r{self.rank}/{self.targets} b{self.batch}x{self.seq} {ckpt} "
                f"{self.optimizer} {self.attention}" + (f" {self.compute_dtype}" if self.compute_dtype else ""))


# Sizes 0.5B-14B; NF4/FP4/none; ranks 8-64; batch 1-8; seq 512-4096; checkpointing on/off; bf16 and fp16
# compute (fp16: what a Turing card runs); grouped by model so that each random checkpoint is written once.
CASES = [
    Case("Qwen2.5-0.5B", "nf4", 16, "attention", 1, 512, True),
    Case("Qwen2.5-0.5B", "nf4", 16, "all", 4, 1024, False),
    Case("Qwen2.5-0.5B", "none", 16, "all", 2, 2048, True, optimizer="adamw_torch"),
    Case("Llama-3.2-1B", "nf4", 64, "all", 2, 1024, True),
    Case("Llama-3.2-1B", "fp4", 16, "attention", 8, 512, False, double_quant=False),
    Case("Qwen2.5-1.5B", "nf4", 16, "all", 4, 2048, True),
    Case("Qwen2.5-1.5B", "nf4", 16, "attention", 2, 1024, False, attention="eager"),
    Case("Qwen2.5-1.5B", "nf4", 16, "all", 2, 1024, True, compute_dtype="fp16"),
    Case("Gemma-2-2B", "nf4", 16, "all", 2, 1024, True),
    Case("Phi-3.5-mini", "nf4", 16, "all", 2, 1024, True),
    Case("Llama-3.2-3B", "nf4", 16, "all", 1, 4096, True),
    Case("Llama-3.2-3B", "fp4", 32, "attention", 4, 1024, True, optimizer="adamw_torch", double_quant=False),
    Case("Llama-3.2-3B", "nf4", 16, "all", 4, 2048, True, compute_dtype="fp16"),
    Case("Qwen2.5-3B", "none", 16, "attention", 2, 1024, True),
    Case("Qwen2.5-7B", "nf4", 16, "attention", 1, 512, True),
    Case("Qwen2.5-7B", "nf4", 16, "all", 4, 2048, True),
    Case("Mistral-7B-v0.3", "nf4", 16, "all", 4, 2048, True),
    Case("Llama-3.1-8B", "nf4", 16, "all", 4, 2048, True),
    Case("Llama-3.1-8B", "fp4", 16, "attention", 2, 1024, False, optimizer="adamw_8bit"),
    Case("Llama-3.1-8B", "none", 16, "attention", 1, 1024, True),
    Case("Qwen2.5-14B", "nf4", 8, "attention", 2, 2048, True),  # what auto_lora picks at 14B: r8, attention
]

TARGET_NAMES = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj"],
}


def compute_dtype_name() -> str:
    """This GPU's training precision, by the studio's one rule (`plan.precision_for`)."""
    import torch

    from qlora_studio.plan import precision_for

    return precision_for("cuda", tuple(torch.cuda.get_device_capability()))


def estimate_case(case: Case, compute_dtype: str = "bf16") -> MemoryBreakdown:
    """The estimate for a case; its own ``compute_dtype``, when it has one, wins over the argument."""
    compute_dtype = case.compute_dtype or compute_dtype
    return estimate(
        load_architecture(case.model), method="qlora" if case.quant != "none" else "lora", quant=case.quant,
        double_quant=case.double_quant, rank=case.rank, targets=case.targets, batch=case.batch, seq=case.seq,
        grad_checkpointing=case.checkpointing, optimizer=case.optimizer, attention=case.attention,
        compute_dtype=compute_dtype,
    )


def allocator_view(e: MemoryBreakdown, optimizer: str) -> int:
    """The part of the estimate PyTorch's allocator sees: without the CUDA context and the paged states."""
    paged = e.breakdown["optimizer"] if optimizer.startswith("paged") else 0
    return e.total_bytes - CUDA_CONTEXT_BYTES - paged


# ------------------------------------------------------------------ building and measuring

def hf_config(arch: Architecture):
    """A transformers config with the architecture's shapes (random weights will be built from it)."""
    from transformers import AutoConfig

    cfg = arch.to_config_dict()
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def write_random_checkpoint(arch: Architecture, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):  # initialise on the GPU: fast even for 8B parameters
        model = AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def nvml_used_bytes() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        index = int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0)
        used = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used
        pynvml.nvmlShutdown()
        return int(used)
    except Exception:
        return None


def make_optimizer(name: str, params):
    import torch

    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=1e-4)
    import bitsandbytes as bnb

    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=1e-4)
    return bnb.optim.PagedAdamW8bit(params, lr=1e-4)


def run_case(case: Case, folder: Path, steps: int, baseline_used: int | None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    arch = load_architecture(case.model)
    compute = case.compute_dtype or compute_dtype_name()
    dtype = torch.bfloat16 if compute == "bf16" else torch.float16
    attention = "eager" if arch.model_type == "gemma2" else case.attention
    kwargs = dict(dtype=dtype, attn_implementation=attention, device_map={"": 0})
    if case.quant != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=case.quant, bnb_4bit_use_double_quant=case.double_quant,
            bnb_4bit_compute_dtype=dtype)
    gc.collect()
    torch.cuda.empty_cache()
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.config.use_cache = False
    if case.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    names = [n for n in TARGET_NAMES[case.targets] if any(m.endswith("." + n) for m, _ in model.named_modules())]
    model = get_peft_model(model, LoraConfig(r=case.rank, lora_alpha=2 * case.rank, lora_dropout=0.0,
                                             target_modules=names, task_type="CAUSAL_LM"))
    model.train()
    optimizer = make_optimizer(case.optimizer, [p for p in model.parameters() if p.requires_grad])

    ids = torch.randint(1, arch.vocab_size, (case.batch, case.seq), device="cuda")
    mask = torch.ones_like(ids)
    mask[1:, -(case.seq // 8):] = 0  # rows after the first end in padding, as real batches do
    labels = ids.masked_fill(mask == 0, -100)

    gc.collect()
    torch.cuda.empty_cache()  # forget loading's transients: the estimate is about training
    torch.cuda.reset_peak_memory_stats()
    loaded = torch.cuda.memory_allocated()
    started = time.time()
    for _ in range(steps):
        with torch.autocast("cuda", dtype=dtype):
            out = model(input_ids=ids, attention_mask=mask if case.batch > 1 else None, labels=labels)
        loss = out.loss
        del out  # the Trainer drops the output before backward
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    result = {
        "loaded_allocated": loaded,
        "max_allocated": torch.cuda.max_memory_allocated(),
        "max_reserved": torch.cuda.max_memory_reserved(),
        "seconds_per_step": (time.time() - started) / steps,
        "loss": float(loss),
        "compute_dtype": compute,
    }
    used = nvml_used_bytes()
    result["nvml_used"] = used - baseline_used if (used is not None and baseline_used is not None) else None
    del model, optimizer, loss, ids, mask, labels
    gc.collect()
    torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------ report

def err(estimated: int, measured: int | None) -> float | None:
    return None if not measured else (estimated - measured) / measured


def fmt_err(x: float | None) -> str:
    return "    -" if x is None else f"{x:+6.1%}"


def print_row(label: str, e: MemoryBreakdown, alloc_view: int, r: dict) -> None:
    g = lambda n: "     -" if n is None else f"{n / GiB:6.2f}"  # noqa: E731
    print(f"{label:<70} {g(e.total_bytes)} {g(alloc_view)} | {g(r.get('max_reserved'))} "
          f"{fmt_err(err(alloc_view, r.get('max_reserved')))} | {g(r.get('max_allocated'))} "
          f"{fmt_err(err(alloc_view, r.get('max_allocated')))} | {g(r.get('nvml_used'))} "
          f"{fmt_err(err(e.total_bytes, r.get('nvml_used')))}", flush=True)


HEADER = (f"{'configuration':<70} {'est':>6} {'est*':>6} | {'resvd':>6} {'err':>6} | {'alloc':>6} {'err':>6} | "
          f"{'nvml':>6} {'err':>6}   (GiB; est* = estimate without CUDA context and paged states)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="run the configurations whose label contains this text")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--list", action="store_true", help="print the configurations and estimates, measure nothing")
    p.add_argument("--out", type=Path, help="write one JSON line per configuration here")
    p.add_argument("--record", action="store_true", help="record each run in this machine's calibration file")
    args = p.parse_args(argv)
    cases = [c for c in CASES if not args.only or args.only.lower() in c.label.lower()]

    if args.list:
        print(HEADER)
        for case in cases:
            e = estimate_case(case)
            print_row(case.label, e, allocator_view(e, case.optimizer), {})
        return 0

    try:
        import torch
    except ImportError:
        print("vram_accuracy: torch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("vram_accuracy: no CUDA GPU available (torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU, or use --list for the estimates alone", file=sys.stderr)
        return 2
    if any(c.quant != "none" or "8bit" in c.optimizer for c in cases):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            print("vram_accuracy: bitsandbytes is not installed (needed for 4-bit and 8-bit optimizers)",
                  file=sys.stderr)
            return 2

    baseline = nvml_used_bytes()  # before this process creates a CUDA context
    torch.cuda.init()
    gpu = torch.cuda.get_device_name(0)
    compute = compute_dtype_name()
    print(f"GPU: {gpu}, compute {compute}, torch {torch.__version__}, {args.steps} steps per configuration")
    print(HEADER)
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="vram-accuracy-"))
    try:
        for model_name in dict.fromkeys(c.model for c in cases):
            folder = workdir / model_name
            write_random_checkpoint(load_architecture(model_name), folder)
            for case in (c for c in cases if c.model == model_name):
                e = estimate_case(case, compute)
                view = allocator_view(e, case.optimizer)
                try:
                    r = run_case(case, folder, args.steps, baseline)
                except torch.cuda.OutOfMemoryError:
                    gc.collect()
                    torch.cuda.empty_cache()
                    r = {"oom": True}
                print_row(case.label + (" OOM" if r.get("oom") else ""), e, view, r)
                row = {"case": asdict(case), "label": case.label, "gpu": gpu, "estimate": e.to_dict(),
                       "estimate_allocator_view": view, **r}
                rows.append(row)
                if args.out:
                    with args.out.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")
                if args.record and not r.get("oom"):
                    from qlora_studio.estimator import record_measurement

                    measured = r["nvml_used"] or (r["max_reserved"] + CUDA_CONTEXT_BYTES)
                    record_measurement(e.total_bytes, measured, gpu, label=case.label)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    measured = [r for r in rows if not r.get("oom")]
    if measured:
        reserved = [err(r["estimate_allocator_view"], r["max_reserved"]) for r in measured]
        print(f"\nmedian |error| vs max_memory_reserved: {statistics.median(abs(x) for x in reserved):.1%}; "
              f"worst under-estimate {min(reserved):+.1%}; "
              f"{sum(x < -0.10 for x in reserved)} of {len(reserved)} more than 10% under")
        nvml = [err(r["estimate"]["total_bytes"], r["nvml_used"]) for r in measured if r.get("nvml_used")]
        if nvml:
            print(f"median |error| vs NVML (nvidia-smi view): {statistics.median(abs(x) for x in nvml):.1%}; "
                  f"worst under-estimate {min(nvml):+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
