"""The Trainer side of a run: executing a `RunPlan` with transformers' Trainer and peft.

`train` is one attempt at a run (the retry loop around it is `training.run_training`): it loads the
data, the model and the adapters as the plan says, checks the plan against the loaded model (the LoRA
targets exist; the attention keeps packed examples apart), builds the Trainer with `StudioCallback`,
trains, and writes the adapter, summary.json and the final status.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from .attention import NAME as PACKED_ATTENTION
from .callback import StopDuringEvaluation, callback_class, log_finding, peak_memory_mb
from .config import TrainConfig
from .errors import StudioError, TrainingError
from .plan import Machine, RunPlan, plan_run
from .runs import RunFolder, checkpoint_step, read_metrics_from


def load_init_adapter(model, path: str, log) -> None:
    """Start from an earlier run's LoRA weights (same rank and targets)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(path) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise TrainingError(f"init_adapter: {path} does not fit this model's LoRA layers "
                            f"(e.g. {unexpected[0]}); start from scratch instead", "init_adapter")
    log(f"starting from the adapter weights in {path} ({len(state)} tensors); "
        "the optimizer and the learning-rate schedule start fresh because settings changed")


# ------------------------------------------------------------------ one attempt at a run


def run_log(run: RunFolder, echo: bool):
    """train.log's writer (and the terminal's, with ``echo``); a run's other processes log nothing."""
    path = run.path / "train.log"

    def log(msg: str) -> None:
        if not run.writer:
            return
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as e:  # a full disk must not stop the run from recording how it ended
            if not echo:
                print(f"{run.name}: cannot write train.log ({e.strerror or e}): {line}", file=sys.stderr, flush=True)
        if echo:
            print(line, flush=True)

    return log


def _prepare_data(run: RunFolder, cfg: TrainConfig, tokenizer, stored: dict, log):
    from .data import prepare_dataset
    from .diagnose import data_findings
    from .runs import atomic_write_json
    from .taskeval import record_heldout

    data = prepare_dataset(cfg.data, tokenizer, cfg.max_seq_len, cfg.eval_fraction, cfg.seed, cfg.data_format,
                           cfg.system_prompt)
    rep = data.report
    log(f"data {rep.path}: format {rep.format}, {rep.usable}/{rep.rows} rows usable, "
        f"{rep.truncated} truncated at {cfg.max_seq_len}, train {len(data.train)}, eval {len(data.eval) if data.eval else 0}")
    for issue in rep.errors[:20]:
        log("  skipped " + issue.format(rep.path))
    if run.writer:
        atomic_write_json(run.path / "data_report.json", rep.to_dict())
        record_heldout(run, cfg, data)  # the rows task evaluation and the golden prompts may use
    for finding in data_findings(rep.to_dict(), stored):
        log_finding(log, finding)
    return data


def _fit_plan_to_model(run: RunFolder, cfg: TrainConfig, plan: RunPlan, model, source_path: Path, machine: Machine,
                       log) -> RunPlan:
    """The plan, checked against the loaded model. LoRA targets are planned from the model's config; when
    that could not be read, or a target is missing from the model, they are planned from its layers.
    Packing is used only where the attention keeps packed examples apart. Each change is recorded in
    plan.json's ``adjustments``."""
    from .batching import labelled_logits_supported, packing_respected
    from .loss import supported as loss_supported
    from .loading import count_parameters, linear_module_names

    adjustments = []
    names = linear_module_names(model)
    if not plan.targets and plan.architecture is None:  # planned before the model's config could be read
        from .catalog import load_architecture

        try:
            arch = load_architecture(source_path)
        except (StudioError, OSError, ValueError):
            arch = None
        if arch is not None:
            full = plan_run(cfg, machine, arch)
            full.batch_size, full.grad_accum = plan.batch_size, plan.grad_accum
            plan = full
    if not plan.targets or not set(plan.targets) <= set(names):
        replanned = plan_run(cfg, machine, None, module_names=names, n_params=count_parameters(model))
        if plan.targets:
            adjustments.append(f"LoRA targets {plan.targets} -> {replanned.targets}: the loaded model's linear "
                               f"layers are {names}")
        for key in ("rank", "alpha", "targets", "model_params"):
            setattr(plan, key, getattr(replanned, key))
        plan.reasons["lora"] = replanned.reasons.get("lora", "as configured") + " (from the loaded model's layers)"
    checks = {}
    if plan.batching == "packed" and plan.parallel == "fsdp":  # as configured: no process holds the whole model
        checks["packing"] = "not checked under FSDP (packed as configured)"
    elif plan.batching == "packed":
        ok, why = packing_respected(model)
        checks["packing"] = why
        if not ok:
            plan.batching = "grouped"
            plan.reasons["batching"] = "padded batches grouped by length: " + why
            adjustments.append("batching packed -> grouped: " + why)
    if plan.sequences and plan.batching != "packed":
        plan.batch_unit = "examples"
        plan.reasons["batch_unit"] = "examples: sequences need packed batches, and this run's are " + plan.batching
        adjustments.append("batch unit sequences -> examples: the batches are not packed")
    # speed settings the loaded model must support: (plan field, planned value, check, fallback, its reason)
    for key, planned, supported, fallback, reason in (
            ("logits", "labelled", labelled_logits_supported, "all", "every position"),
            ("cross_entropy", "chunked", loss_supported, "torch", "transformers' cross-entropy")):
        if getattr(plan, key) != planned:
            continue
        ok, why = supported(model)
        checks[key] = why
        if not ok:
            setattr(plan, key, fallback)
            plan.reasons[key] = f"{reason}: {why}"
            adjustments.append(f"{key} {planned} -> {fallback}: {why}")
    for a in adjustments:
        log("plan adjusted: " + a)
    doc = run.plan()
    run.update_plan(adjustments=(doc.get("adjustments") or []) + adjustments, checks=checks)
    return plan


def _schedule(cfg: TrainConfig, plan: RunPlan, n_train: int) -> dict:
    steps_per_epoch = math.ceil(n_train / plan.effective_batch)
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(steps_per_epoch * cfg.epochs))
    eval_steps = cfg.eval_steps or max(1, total // 5)
    return {"train_examples": n_train, "steps_per_epoch": steps_per_epoch, "total_steps": total,
            "eval_steps": eval_steps, "save_steps": cfg.save_steps or eval_steps}


def _training_args(run: RunFolder, cfg: TrainConfig, plan: RunPlan, schedule: dict, has_eval: bool,
                   own_rotation: bool = False):
    from transformers import TrainingArguments

    from .parallel import fsdp_options

    several = {}
    if plan.processes > 1:  # the Trainer's own DDP / FSDP2 (through accelerate); every adapter weight is used
        several = {"ddp_find_unused_parameters": False}
        if plan.parallel == "fsdp":
            several.update(fsdp=True, fsdp_config=fsdp_options(plan))
    return TrainingArguments(
        **several,
        output_dir=str(run.checkpoints_dir),
        per_device_train_batch_size=plan.batch_size,
        per_device_eval_batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # show NaN/inf losses as they are
        eval_strategy="steps" if has_eval else "no",
        eval_steps=schedule["eval_steps"],
        save_strategy="steps",
        save_steps=schedule["save_steps"],
        # The checkpoint with the lowest eval loss survives rotation: "stop at the best checkpoint"
        # (the overfitting fix) needs it. Nothing is reloaded at the end. With a task metric the golden
        # prompts' callback rotates instead, keeping the best by that metric too (`golden.prune_checkpoints`).
        save_total_limit=None if own_rotation else 2,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False if has_eval else None,
        optim=plan.optimizer,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        use_cpu=plan.device == "cpu",
        seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
        # Counted by the batch's attention_mask: real tokens only, packed or padded.
        include_num_input_tokens_seen="non_padding",
        # Without packing, examples of similar length share a batch, so less compute goes to padding.
        train_sampling_strategy="group_by_length" if plan.batching == "grouped" else "random",
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def _collator(plan: RunPlan, tokenizer, model):
    from transformers import DataCollatorForSeq2Seq

    from .batching import PackedBatches

    if plan.batching != "packed":
        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if plan.attention == PACKED_ATTENTION:  # attention per example: a longer row costs nothing more
        return PackedBatches(pad_id, attention_span=None)
    hidden = getattr(model.config, "hidden_size", None) or 1024
    return PackedBatches(pad_id, attention_span=(2.2 if plan.device == "cpu" else 6.0) * hidden)


def _add_adapters(model, cfg: TrainConfig, plan: RunPlan, resume: bool, log):
    from peft import LoraConfig, get_peft_model

    if plan.gradient_checkpointing and plan.parallel != "fsdp":  # FSDP checkpoints its own layers (`fsdp_options`)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=plan.rank, lora_alpha=plan.alpha, target_modules=plan.targets,
                                             lora_dropout=plan.lora_dropout, bias="none", task_type="CAUSAL_LM"))
    if plan.dropout_masks == "16bit" and plan.lora_dropout > 0:
        from .dropout import use_16bit_masks

        log(f"LoRA dropout: 16-bit masks in {use_16bit_masks(model)} layers ({plan.reasons.get('dropout_masks') or 'as configured'})")
    from .compat import skip_lora_input_copies_under_autocast

    skip_lora_input_copies_under_autocast(model)  # peft's fp32 copies of their inputs: see compat
    if plan.decoded_weights:
        from .decoded import keep_decoded

        log(f"4-bit weights: kept decoded in {keep_decoded(model)} layers "
            f"({plan.reasons.get('decoded_weights') or 'as configured'})")
    if plan.lora_update == "fused":
        from .lora_update import fuse

        log(f"LoRA update: fused in {fuse(model)} layers ({plan.reasons.get('lora_update') or 'as configured'})")
    if plan.cross_entropy == "chunked":
        from .loss import install

        install(model)
        log(f"cross-entropy: chunked ({plan.reasons.get('cross_entropy') or 'as configured'})")
    if cfg.init_adapter and not resume:
        load_init_adapter(model, cfg.init_adapter, log)
    return model


def train(run: RunFolder, cfg: TrainConfig, stored: dict, stop_event: threading.Event, resume: bool, log,
          extra_callbacks: list, world=None) -> dict:
    """One attempt at the run in ``run`` (its plan in plan.json); returns the final status. ``world``: this
    process's place among the run's processes (`world.World`; None: the only one)."""
    import torch
    from transformers import PrinterCallback, set_seed

    from .batching import pack_sequences, studio_trainer_class
    from .cpu_share import threads_callback
    from .compat import keep_4bit_weights_trainable
    from .diagnose import Diagnoser, settings_view
    from .golden import golden_callback
    from .loading import count_parameters, load_plan_model, load_tokenizer
    from .models import resolve_model
    from .world import World

    world = world or World()
    set_seed(cfg.seed)
    machine = Machine.detect(cfg.device)
    doc = run.plan()
    plan = RunPlan.from_dict(doc["plan"])
    source = resolve_model(cfg.model)
    log(f"model {cfg.model} -> {source.path} ({source.kind}); device: {plan.machine}, {plan.precision}")
    tokenizer = load_tokenizer(source.path, cfg.trust_remote_code)
    data = _prepare_data(run, cfg, tokenizer, stored, log)

    model = load_plan_model(source.path, plan, cfg.trust_remote_code)
    keep_4bit_weights_trainable(model)
    model.config.use_cache = False
    n_params = count_parameters(model)
    plan = _fit_plan_to_model(run, cfg, plan, model, source.path, machine, log)
    packing = (run.plan().get("checks") or {}).get("packing")
    log(f"speed: attention {plan.attention}; gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}"
        f" ({plan.reasons.get('gradient_checkpointing', 'as configured')}); batching {plan.batching} "
        f"({packing if packing and plan.batching == 'packed' else plan.reasons.get('batching', 'as configured')})")
    model = _add_adapters(model, cfg, plan, resume, log)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"LoRA r={plan.rank} alpha={plan.alpha} on {plan.targets} ({plan.reasons.get('lora') or 'as configured'}); "
        f"trainable {trainable:,} of {n_params:,} parameters ({100 * trainable / n_params:.2f}%)")
    n_examples = len(data.train)
    if plan.sequences:
        data = replace(data, train=pack_sequences(data.train, plan.max_seq_len))
    schedule = _schedule(cfg, plan, len(data.train))
    if plan.sequences:
        _log_sequences(schedule, n_examples, plan, cfg, log)
    run.update_plan(plan=plan.to_dict(), schedule=schedule,
                    model={"path": str(source.path), "kind": source.kind, "trainable_params": trainable,
                           "total_params": n_params, "trainable_share": trainable / n_params})

    diagnoser = Diagnoser(settings_view(stored, run.plan()))
    eval_batches = math.ceil(len(data.eval) / plan.batch_size) if data.eval is not None else None
    callback = callback_class()(run, stop_event, plan.device, log, diagnoser, eval_batches=eval_batches, world=world)
    # Golden prompts are answered by rank 0 alone (a DDP replica generates without the others); a sharded
    # model cannot generate from one process, so FSDP runs have none (the plan says so).
    answers = data.eval is not None and world.main and plan.parallel != "fsdp"
    golden = golden_callback(run, cfg, tokenizer, data, plan, log) if answers else None
    args = _training_args(run, cfg, plan, schedule, data.eval is not None, own_rotation=bool(golden and golden.prunes))
    trainer = studio_trainer_class()(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                                     data_collator=_collator(plan, tokenizer, model), processing_class=tokenizer,
                                     callbacks=[callback, *([golden] if golden else []), *extra_callbacks])
    if plan.device == "cpu":  # a configured count, or threads that follow the cores other processes leave free
        trainer.add_callback(threads_callback(log, plan.cpu_threads))
    trainer.packed = plan.batching == "packed"
    trainer.labelled_logits = plan.logits == "labelled"
    trainer.remove_callback(PrinterCallback)  # our callback logs; the printer would echo raw dicts
    resume_from = _resume_point(run, world, diagnoser, log) if resume else None
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    total_steps = schedule["total_steps"]
    run.set_status("running", phase="training", total_steps=total_steps)
    if total_steps > 0:
        try:
            result_metrics = trainer.train(resume_from_checkpoint=resume_from).metrics
        except StopDuringEvaluation:
            result_metrics = _stopped_during_evaluation(trainer, callback, log)
    else:  # a run that starts from an adapter with nothing left to train: evaluate and keep it
        log("no steps left to train: evaluating the starting adapter and keeping it")
        result_metrics = {}
        trainer.state.global_step = 0
    return _finish(run, plan, trainer, callback, data, result_metrics, bool(resume_from), log, golden, world)


def _log_sequences(schedule: dict, n_examples: int, plan: RunPlan, cfg: TrainConfig, log) -> None:
    """``batch_unit: sequences``: what packing the examples into sequences did to the steps."""
    n_seq, steps = schedule["train_examples"], schedule["steps_per_epoch"]
    schedule["examples_per_step"] = round(n_examples / steps, 1)
    log(f"batch unit sequences: {n_examples} examples packed into {n_seq} sequences of up to {plan.max_seq_len} "
        f"tokens ({n_examples / n_seq:.1f} examples each): {steps} optimizer steps per epoch instead of "
        f"{math.ceil(n_examples / plan.effective_batch)}, about {n_examples / steps:.1f} examples per step instead "
        f"of {plan.effective_batch}, at the same learning rate {cfg.learning_rate:g}")


def _resume_point(run: RunFolder, world, diagnoser, log) -> str:
    """The checkpoint a resumed attempt continues from; the metrics and samples logged after it are dropped
    (by rank 0, before any process reads them again)."""
    from .golden import truncate_samples_after
    from .recovery import truncate_metrics_after

    ckpt = run.last_checkpoint()
    if ckpt is None:
        raise TrainingError(f"{run.path}: no checkpoint to resume from")
    if run.writer:
        truncate_metrics_after(run, checkpoint_step(ckpt))
        truncate_samples_after(run, checkpoint_step(ckpt))
    world.barrier()  # every process reads the history as rank 0 left it
    log(f"resuming from {ckpt.name}")
    diagnoser.add_all(run.metrics())  # the detectors see the history they continue (findings already logged)
    return str(ckpt)


def _stopped_during_evaluation(trainer, callback, log) -> dict:
    """A stop asked for in the middle of an evaluation: the evaluation is abandoned (its step's training
    is complete) and a checkpoint is saved, as a stop at the end of a step does."""
    from .compat import save_checkpoint_now

    callback.stopped = True
    step = trainer.state.global_step
    log(f"stop requested during an evaluation: abandoned it; saving a checkpoint at step {step}")
    callback.run.set_status("running", phase="stopping: saving checkpoint", eval_done=None, eval_total=None)
    trainer.model.train()
    if not save_checkpoint_now(trainer):
        log("this transformers version cannot save a checkpoint outside its loop: the run resumes from the last one")
    return {"train_runtime": time.time() - callback.start_time}


def _finish(run: RunFolder, plan: RunPlan, trainer, callback, data, result_metrics: dict, resumed: bool, log,
            golden=None, world=None) -> dict:
    """After training: the rollback of a NaN run, or the adapter, the final evaluation (with the golden
    prompts' last answers) and summary.json (``best``: the best step, by the task metric when there is one).
    Every process of a multi-process run comes here at the same step and takes the same branches; only
    rank 0 (``run.writer``) writes."""
    from .golden import best_summary
    from .recovery import roll_back_nonfinite

    step = trainer.state.global_step
    total_steps = (run.plan().get("schedule") or {}).get("total_steps")
    if callback.nonfinite is not None:
        good = roll_back_nonfinite(run, callback.nonfinite, log) if run.writer else None
        f = callback.nonfinite
        run.write_summary({"global_step": step, "total_steps": total_steps, "device": plan.device,
                           "peak_memory": peak_memory_mb(plan.device), "nonfinite_step": f.step,
                           "last_good_checkpoint": good.name if good else None})
        return run.set_status("failed", error=f"non-finite values at step {f.step}: {f.message}", error_kind="nonfinite",
                              finished_at=time.time(), phase="failed", step=step,
                              last_checkpoint=good.name if good else None)

    if callback.disk_full is not None:
        ckpt = run.last_checkpoint()
        return run.set_status("failed", error=callback.disk_full + (
            f"; free some space, then resume from {ckpt.name}" if ckpt else "; free some space and start again"),
            error_kind="disk_full", finished_at=time.time(), phase="failed", step=step,
            last_checkpoint=ckpt.name if ckpt else None)

    replicas = _replicas(trainer, plan, world) if world is not None and world.multi else None
    if plan.parallel == "fsdp":
        trainer.save_model(str(run.adapter))  # gathers the shards (every process); rank 0 writes
    elif run.writer:
        trainer.model.save_pretrained(str(run.adapter))
        trainer.processing_class.save_pretrained(str(run.adapter))
    final_eval = {}
    if data.eval is not None:
        records, _ = read_metrics_from(run.metrics_path)
        evals = [r for r in records if r.get("type") == "eval"]
        # Several processes evaluate together: each decides from what it saw, never from a file rank 0 writes.
        last_eval = callback.last_eval_step if replicas is not None else (evals[-1]["step"] if evals else None)
        if last_eval != step and not callback.stopped:
            run.set_status("running", phase="final evaluation", eval_done=None, eval_total=None)
            final_eval = trainer.evaluate()  # a stopped run reports its last evaluation instead: stopping stays quick
        elif evals:
            final_eval = {k: v for k, v in evals[-1].items() if k.startswith("eval_")}
    state = "stopped" if callback.stopped else "completed"
    if not run.writer:
        return {"state": state, "step": step}
    records, _ = read_metrics_from(run.metrics_path)
    train_losses = [r["loss"] for r in records if r.get("type") == "train"]
    tokens = trainer.state.num_input_tokens_seen
    runtime = result_metrics.get("train_runtime")
    summary = {
        "train_runtime_s": runtime, "global_step": step, "total_steps": total_steps, "epoch": trainer.state.epoch,
        "non_pad_tokens": tokens, "tokens_per_s": tokens / runtime if runtime else None,
        "final_loss": train_losses[-1] if train_losses else None,
        "first_loss": train_losses[0] if train_losses else None,
        "eval": final_eval, "peak_memory": peak_memory_mb(plan.device), "device": plan.device, "resumed": resumed,
    }
    if plan.device == "cuda":
        import torch

        summary["gpu_total_mb"] = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**20
    if replicas is not None:
        summary["processes"] = replicas
    summary["memory_estimate"] = _estimate_vs_measured(run, plan, summary["peak_memory"], log)
    if golden is not None:
        summary["golden"] = golden.summary()
    summary["best"] = best_summary(run, golden)
    if summary["best"]:
        log(f"best step {summary['best']['step']}: {summary['best']['why']}")
    run.write_summary(summary)
    final = summary["final_loss"]
    log(f"{state} at step {step}: final loss {f'{final:.4g}' if isinstance(final, (int, float)) else '-'}, "
        f"{summary['tokens_per_s'] or 0:.0f} non-pad tokens/s; adapter in {run.adapter}")
    return run.set_status(state, finished_at=time.time(), phase=state, step=step)


def _replicas(trainer, plan: RunPlan, world) -> dict:
    """What each process ended with: its peak memory and, under DDP, the digest of its adapter weights (the
    replicas must be identical: DDP averaged the same gradients into each)."""
    from .world import adapter_digest

    mine = {"rank": world.rank, "peak_memory": peak_memory_mb(plan.device)}
    if plan.parallel == "ddp":
        mine["adapter_sha256"] = adapter_digest(trainer.model)
    ranks = world.gather(mine)
    digests = [r.get("adapter_sha256") for r in ranks]
    return {"count": world.size, "parallel": plan.parallel, "ranks": ranks,
            "adapters_identical": len(set(digests)) == 1 if plan.parallel == "ddp" else None}


def _estimate_vs_measured(run: RunFolder, plan: RunPlan, peak: dict, log) -> dict | None:
    """The plan's memory estimate next to the measured peak; on CUDA the pair (the estimate before any
    calibration) is recorded so the estimator can calibrate itself to this card."""
    from .estimator import record_measurement

    mem = plan.memory or {}
    if not mem.get("estimate_bytes"):
        log("no memory estimate for this model (its shape is not one the estimator knows)")
        return None
    out = {"estimated_bytes": mem["estimate_bytes"], "breakdown": mem.get("breakdown")}
    if plan.device == "cuda" and peak.get("memory_reserved_mb"):
        import torch

        measured = int(peak["memory_reserved_mb"] * 2**20)
        raw = mem.get("uncalibrated_bytes") or mem["estimate_bytes"]
        out.update(measured_bytes=measured, error=(mem["estimate_bytes"] - measured) / measured)
        cfg = run.config()
        record_measurement(raw, measured, torch.cuda.get_device_name(0), model=str(cfg.get("model")),
                           batch=plan.batch_size, seq=plan.max_seq_len, quant=plan.quant)
        log(f"memory: estimated {mem['estimate_bytes'] / 2**30:.2f} GiB, measured peak {measured / 2**30:.2f} GiB reserved")
    return out
