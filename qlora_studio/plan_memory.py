"""The plan's memory: the estimate for a plan (`estimator.estimate`), and the choices made from it on the
CPU -- gradient checkpointing, and 4-bit weights kept decoded (`decoded`) -- each against half of the RAM
free now. `plan.plan_run` calls these; nothing else does."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import TrainConfig
    from .plan import Machine, RunPlan

GiB = 2**30
# benchmarks/lever_ab.py --lever decoded on a 2-core AVX512-BF16 EPYC (`decoded`'s docstring): the same
# batches, alternating in one training process.
DECODED_SPEED = "training steps took 0.92x the time on a 2-core CPU"


def estimate_for(plan: RunPlan, arch, machine: Machine, grad_checkpointing: bool, calibrated: bool = False):
    from .estimator import estimate

    attention_names = {layer.name for layer in arch.linear_layers() if layer.group == "attention"}
    targets = "attention" if set(plan.targets) <= attention_names else "all"
    return estimate(arch, method="qlora" if plan.quant != "none" else "lora",
                    quant=None if plan.quant == "none" else plan.quant, double_quant=plan.double_quant,
                    rank=plan.rank, targets=targets, batch=plan.batch_size, seq=plan.max_seq_len,
                    grad_checkpointing=grad_checkpointing, optimizer=plan.optimizer, attention=plan.attention,
                    compute_dtype=plan.precision, decoded_weights=plan.decoded_weights,
                    calibrated=calibrated, gpu_name=machine.gpu_name if calibrated else None)


def checkpointing(config: TrainConfig, plan: RunPlan, arch, machine: Machine) -> tuple[bool, str | None]:
    """Gradient checkpointing recomputes each layer's forward pass in backward (about a third more compute)
    to keep activations small. On a GPU memory is the limit, so it stays on unless the user turns it off;
    on the CPU it is turned off when the estimate without it fits in half of the RAM free now."""
    if config.gradient_checkpointing is not None:
        return config.gradient_checkpointing, None
    if plan.device == "cuda":
        return True, "GPU memory is the limit"
    need = None
    if arch is not None:
        try:
            need = estimate_for(plan, arch, machine, grad_checkpointing=False).total_bytes
        except ValueError:
            need = None
    available = machine.ram_available_bytes
    if need is None or not available:
        return True, "cannot tell whether the run fits in RAM without it"
    if need <= available / 2:
        return False, f"about {need / GiB:.1f} GiB needed without it, under half of the RAM free now"
    return True, f"about {need / GiB:.1f} GiB needed without it, more than half of the RAM free now"


def decoded_weights(config: TrainConfig, plan: RunPlan, arch, machine: Machine) -> tuple[bool, str | None]:
    """Whether the 4-bit weights are kept decoded (`decoded`): the same numbers, no decoding at each use, a
    copy of the base in the compute dtype in memory. On a GPU the memory is what QLoRA saves, so never; on
    the CPU, when the estimate with the copy fits in half of the RAM free now (the rule `checkpointing` uses)."""
    if plan.quant == "none":
        if config.decoded_weights:
            raise ConfigError("decoded_weights: the base is not 4-bit (quant: none), so there is nothing to decode",
                              field="decoded_weights", why="only a 4-bit base is decoded")
        return False, None
    if plan.device != "cpu":
        if config.decoded_weights:
            raise ConfigError("decoded_weights: on a GPU the 4-bit weights are decoded at each use (what QLoRA saves "
                              "memory with); keeping them decoded is for training on the CPU",
                              field="decoded_weights", why="keeping the weights decoded is for the CPU")
        return False, (None if config.decoded_weights is not None else "GPU memory is the limit: QLoRA's 4-bit base")
    if config.decoded_weights is not None:
        return config.decoded_weights, None
    try:
        with_copy = replace(plan, decoded_weights=True)
        need = estimate_for(with_copy, arch, machine, plan.gradient_checkpointing).total_bytes if arch else None
    except ValueError:
        need = None
    available = machine.ram_available_bytes
    if need is None or not available:
        return False, "cannot tell whether a decoded copy of the base fits in RAM"
    copy = f"about {need / GiB:.1f} GiB needed with a {plan.precision} copy of the base"
    if need <= available / 2:
        return True, (f"{copy}, under half of the RAM free now; the same numbers without decoding each weight at "
                      f"each use ({DECODED_SPEED})")
    return False, f"{copy}, more than half of the RAM free now"


def memory(plan: RunPlan, arch, machine: Machine) -> dict | None:
    from .estimator import HEADROOM, calibration_summary, fits

    if arch is None:
        return None
    try:
        est = estimate_for(plan, arch, machine, plan.gradient_checkpointing)
    except ValueError:
        return None
    per_gpu = {}
    if plan.processes > 1:  # each process's share (`parallel.per_process`): DDP a replica, FSDP a shard
        from .parallel import per_process

        modes = ("ddp", "fsdp") if plan.device == "cuda" else ("ddp",)
        per_gpu = {mode: per_process(est, arch, plan.processes, mode) for mode in modes}
        est = per_gpu.get(plan.parallel, per_gpu["ddp"])
    out = {"estimate_bytes": est.total_bytes, "breakdown": est.breakdown, "where": plan.device}
    if per_gpu:
        out["per_gpu"] = {mode: b.total_bytes for mode, b in per_gpu.items()}
    if plan.device != "cuda":
        return out
    # On a card with finished runs recorded, the estimate is scaled by their measured/estimated ratio.
    summary = calibration_summary(machine.gpu_name) if machine.gpu_name else None
    if summary and plan.processes == 1:
        calibrated = estimate_for(plan, arch, machine, plan.gradient_checkpointing, calibrated=True)
        out.update(estimate_bytes=calibrated.total_bytes, breakdown=calibrated.breakdown,
                   uncalibrated_bytes=est.total_bytes, calibration=summary)
    available = machine.gpu_free_bytes or machine.gpu_total_bytes
    out.update(available_bytes=available, headroom=HEADROOM,
               fits=bool(available) and fits(out["estimate_bytes"], available))
    return out
