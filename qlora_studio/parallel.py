"""More than one process: the plan's part (how many, how they share the work, each one's memory) and the
settings accelerate and the Trainer are given for it. Nothing here starts a process (`launcher` does) or
talks to the others (`world` does); the distributed runtime is torch's (torchrun, DDP, FSDP2) through
accelerate and the Trainer.

- **DDP** (data parallel, the default): every process loads the whole 4-bit model on its own GPU
  (``device_map {"": local_rank}``), the Trainer's dataloader gives each a different share of every step's
  examples, and DDP averages the adapters' gradients, so the replicas stay identical. Per GPU it costs
  what one GPU does, plus DDP's gradient buckets (small: only the adapters have gradients).
- **FSDP2** (sharded): the base weights, adapters, gradients and optimizer states are split across the
  processes; each layer is gathered whole only while it computes. For a model that does not fit one
  card. With QLoRA the 4-bit weights are packed in the compute dtype (``bnb_4bit_quant_storage``, as
  the peft and bitsandbytes FSDP-QLoRA guides say: FSDP only shards floating-point tensors), the model
  is loaded in that dtype, and merging the adapter is a separate single-process step (`chat.merge_run`).
- On the CPU, N processes are N gloo workers with a copy each: no faster, but the same code path, which
  is what the tests run.
"""

from __future__ import annotations

from dataclasses import replace

from .errors import ConfigError

GiB = 2**30
STORAGE_FOR = {"bf16": "bf16", "fp16": "fp32", "fp32": "fp32"}  # FSDP-QLoRA: quant storage by compute dtype


class WorldMismatch(ConfigError):
    """The processes launched are not the ones the run was planned for."""


# ------------------------------------------------------------------ the plan's decisions


def split_processes(config, machine, plan) -> None:
    """The number of processes and each one's share of the effective batch (batch_size x grad_accum as
    configured, kept: each process takes 1/N of it, with the largest micro-batch up to the configured one
    that divides its share). Raises `ConfigError` for a count this machine cannot run."""
    n = config.processes or 1
    reasons = plan.reasons
    gpus = (machine.gpu_count or 1) if machine.device == "cuda" else 0
    if config.processes is None:
        if gpus > 1:
            reasons["processes"] = f"one process on one of the {gpus} GPUs (set processes to use more)"
        return
    if n == 1:
        if config.parallel:
            reasons["parallel"] = "one process: there is nothing to share"
        return
    if machine.device == "cuda" and n > gpus:
        raise ConfigError(f"processes: {n} asked for, but {'this machine has' if machine.here else 'the plan is for'} "
                          f"{gpus} GPU{'s' if gpus != 1 else ''}", field="processes",
                          hint=f"use at most {gpus}, or export the run as a job for a bigger machine (qlora-studio job)")
    if machine.device == "cpu" and config.parallel == "fsdp":
        raise ConfigError("parallel: fsdp needs CUDA GPUs (on the CPU accelerate falls back to DDP, and bitsandbytes' "
                          "4-bit weights cannot be sharded there)", field="parallel", hint="use parallel: ddp")
    total = config.batch_size * config.grad_accum
    if total % n:
        raise ConfigError(f"processes: the effective batch {config.batch_size} x {config.grad_accum} = {total} cannot "
                          f"be split evenly over {n} processes", field="processes",
                          hint=f"make batch_size x grad_accum a multiple of {n}")
    share = total // n
    batch = max(d for d in range(1, min(config.batch_size, share) + 1) if share % d == 0)
    plan.processes, plan.batch_size, plan.grad_accum = n, batch, share // batch
    plan.parallel = config.parallel or "ddp"
    reasons["processes"] = (f"{n} {'processes, one per GPU' if machine.device == 'cuda' else 'gloo worker processes'}; "
                            f"the effective batch {total} kept: each takes micro-batch {batch} x "
                            f"{share // batch} accumulation")


def choose_parallel(config, machine, plan, memory) -> None:
    """DDP or FSDP for a plan of several processes (``memory()``: the plan's memory entry, recomputed)."""
    reasons = plan.reasons
    if plan.device == "cpu":
        reasons["parallel"] = ("on the CPU each gloo worker holds a copy of the model (FSDP needs GPUs): the same "
                               "code path as on GPUs, not faster than one process")
        return
    mem = plan.memory or {}
    per = mem.get("per_gpu") or {}
    if config.parallel is not None:
        reasons["parallel"] = f"{config.parallel} as configured"
    elif not per or mem.get("fits"):
        reasons["parallel"] = ("data parallel: a 4-bit copy per GPU" + (" fits" if per else "")
                               + ", the fastest way to use them")
    else:
        fsdp_need = per["fsdp"]
        available = mem.get("available_bytes") or 0
        from .estimator import HEADROOM

        fits = fsdp_need * (1 + HEADROOM) <= available
        plan.parallel = "fsdp"
        reasons["parallel"] = (f"a copy of the model does not fit one GPU ({per['ddp'] / GiB:.1f} GiB); sharded over "
                               f"{plan.processes} it needs {fsdp_need / GiB:.1f} GiB per GPU"
                               + ("" if fits else ", which does not fit either"))
    if plan.parallel == "fsdp":
        _fsdp_choices(config, plan)
    plan.memory = memory()


def _fsdp_choices(config, plan) -> None:
    """What FSDP-QLoRA needs: the 4-bit storage dtype (the compute dtype; fp32 under fp16, as the peft guide
    says), an optimizer that can save a sharded checkpoint, padded batches unless packing is asked for (its
    check runs the whole model), and no golden prompts (generating from one process would wait for the
    others' shards)."""
    reasons = plan.reasons
    if plan.quant != "none":
        plan.quant_storage = STORAGE_FOR[plan.precision]
        reasons["quant_storage"] = (f"4-bit weights packed in {plan.quant_storage}, "
                                    + ("the compute dtype: FSDP shards only floating-point tensors"
                                       if plan.quant_storage == plan.precision
                                       else "as the peft guide says for fp16 mixed precision"))
    if plan.optimizer == "paged_adamw_8bit":
        if config.optimizer is not None:
            raise ConfigError("optimizer: paged_adamw_8bit fails to save a checkpoint under FSDP with QLoRA (a known "
                              "peft limitation)", field="optimizer", hint="use adamw_torch or adamw_8bit with fsdp")
        plan.optimizer = "adamw_torch"
        reasons["optimizer"] = "32-bit AdamW: paged 8-bit AdamW cannot save a checkpoint under FSDP (peft)"
    if config.batching is None and plan.batching == "packed":
        plan.batching = "grouped"
        reasons["batching"] = ("padded batches grouped by length: whether the attention keeps packed examples apart "
                               "is checked on the whole model, which no FSDP process holds (set batching: packed "
                               "if you know it does)")
    reasons["parallel"] += ("; golden prompts are not answered while training (the model is sharded): "
                            "`qlora-studio eval` answers them afterwards; merge as a separate step")


# ------------------------------------------------------------------ memory per process


def per_process(est, arch, processes: int, mode: str):
    """One of ``processes`` processes' peak memory (`estimator.MemoryBreakdown`) from the single-GPU estimate
    ``est`` (its settings say the quantization and the compute dtype).

    DDP: a full replica; the reducer's buckets hold a second copy of the gradients. FSDP: the base
    weights, adapters, gradients and optimizer states divided by the processes, plus what is gathered
    whole at a time: two decoder layers (the one computing and the one prefetched) and the root unit's
    embeddings and head; activations and logits stay per process."""
    from .estimator import COMPUTE_DTYPES, quantized_linear_bytes

    b = dict(est.breakdown)
    n, settings = processes, est.settings
    if mode == "ddp":
        b["gradients"] *= 2
        notes = ["DDP: a full replica per GPU; its gradient buckets hold a second copy of the adapters' gradients"]
    else:
        c = COMPUTE_DTYPES[settings["compute_dtype"]]
        layer = sum(quantized_linear_bytes(m.weight_params, settings["double_quant"]) if settings["quant"] != "none"
                    else c * m.weight_params for m in arch.linear_layers())
        counts = arch.param_counts()
        gathered = 2 * layer + c * (counts.embeddings + counts.lm_head)
        b["weights"] = b["weights"] // n + gathered
        for key in ("adapters", "optimizer", "gradients"):
            b[key] = b[key] // n
        notes = [f"FSDP over {n}: weights, adapters, gradients and optimizer states sharded 1/{n}; two decoder "
                 f"layers and the embeddings/head ({gathered / GiB:.2f} GiB) gathered whole at a time"]
    return replace(est, total_bytes=sum(b.values()), breakdown=b, assumptions=list(est.assumptions) + notes)


# ------------------------------------------------------------------ what accelerate and the Trainer are given


def fsdp_options(plan) -> dict:
    """The Trainer's ``fsdp_config`` for a FSDP plan (FSDP2; accelerate's `FullyShardedDataParallelPlugin` is
    built from it by `TrainingArguments`): transformer-layer wrapping (the model's ``_no_split_modules``),
    full state dicts (the adapter is saved as one ordinary PEFT folder), RAM-efficient loading (rank 0 reads
    the weights, the others receive them), FSDP's own activation checkpointing when the plan checkpoints."""
    return {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": True,
            "activation_checkpointing": bool(plan.gradient_checkpointing)}


def accelerate_config(plan, nodes: int = 1) -> dict:
    """An `accelerate launch --config_file` configuration for the plan (the same settings the worker gives the
    Trainer: `fsdp_options`), for ``nodes`` machines of ``plan.processes / nodes`` processes each."""
    if plan.processes % nodes:
        raise ConfigError(f"{plan.processes} processes cannot be split evenly over {nodes} nodes", field="processes")
    cfg = {"compute_environment": "LOCAL_MACHINE", "debug": False,
           "distributed_type": {"fsdp": "FSDP", "ddp": "MULTI_CPU" if plan.device == "cpu" else "MULTI_GPU"}.get(
               plan.parallel, "NO"),
           "downcast_bf16": "no", "machine_rank": 0, "main_training_function": "main",
           "mixed_precision": {"bf16": "bf16", "fp16": "fp16"}.get(plan.precision, "no"),
           "num_machines": nodes, "num_processes": plan.processes, "rdzv_backend": "static" if nodes == 1 else "c10d",
           "same_network": True, "tpu_env": [], "tpu_use_cluster": False, "tpu_use_sudo": False,
           "use_cpu": plan.device == "cpu"}
    if plan.parallel == "fsdp":
        opts = fsdp_options(plan)
        cfg["fsdp_config"] = {"fsdp_version": 2, "fsdp_auto_wrap_policy": opts["auto_wrap_policy"],
                              "fsdp_reshard_after_forward": opts["reshard_after_forward"],
                              "fsdp_state_dict_type": opts["state_dict_type"],
                              "fsdp_cpu_ram_efficient_loading": opts["cpu_ram_efficient_loading"],
                              "fsdp_activation_checkpointing": opts["activation_checkpointing"],
                              "fsdp_offload_params": False}
    return cfg


# ------------------------------------------------------------------ the guard at start


def check_world(plan, world, accelerate_fsdp: bool | None = None, cuda_devices: int | None = None) -> None:
    """Refuse to train when the processes launched are not the plan's: another count, FSDP launched for a DDP
    plan (or the reverse), or more processes on a machine than it has GPUs. ``accelerate_fsdp``: whether
    `accelerate launch` was told FSDP (its ACCELERATE_USE_FSDP), None when not launched by accelerate."""
    want = plan.processes
    fix = (f"launch {want} process{'es' if want != 1 else ''} (torchrun --nproc-per-node {want}, or the job's "
           "launch.sh), or plan the run again with --gpus")
    if world.size != want:
        raise WorldMismatch(f"{world.size} process{'es' if world.size != 1 else ''} launched, but the run was planned "
                            f"for {want} (plan.json: processes {want}, {plan.parallel})", field="processes", hint=fix)
    if accelerate_fsdp is not None and accelerate_fsdp != (plan.parallel == "fsdp"):
        raise WorldMismatch(f"accelerate was launched with{'' if accelerate_fsdp else 'out'} FSDP, but the run was "
                            f"planned for {plan.parallel}", field="parallel",
                            hint="use the job's accelerate_config.yaml, or plan the run again with --parallel")
    if plan.device == "cuda" and cuda_devices is not None and world.local_size > cuda_devices:
        raise WorldMismatch(f"{world.local_size} processes on this machine but only {cuda_devices} GPUs visible",
                            field="processes", hint="one process per GPU: lower --nproc-per-node")
    if plan.device == "cuda" and cuda_devices == 0:
        raise WorldMismatch("the run was planned for CUDA GPUs, but this process sees none", field="device",
                            hint="check CUDA_VISIBLE_DEVICES and the torch build")
