"""The command line's planning and troubleshooting verbs: gpu, estimate, recommend; diagnose, fix.
(`cli.py` has the parser, `main` and the verbs that run things.)"""

from __future__ import annotations

import argparse
import json

from .cli import UserError, _finish_run, _print_json, _wait_for


# ---- planning: gpu, estimate, recommend

def cmd_gpu(args) -> int:
    """What this machine offers: NVIDIA GPUs through NVML, or the CPU statement."""
    from .hardware import describe_machine

    machine = describe_machine()
    if args.json:
        _print_json(machine.to_dict())
        return 0
    print(machine.statement)
    for g in machine.gpus:
        other = f"{g.other_processes_bytes / 2**30:.2f} GiB" if g.other_processes_bytes is not None else "not reported"
        print(f"  GPU {g.index} details: used {g.used_bytes / 2**30:.2f} GiB, held by other processes {other}, "
              f"driver {g.driver_version or '?'}, CUDA {g.cuda_driver_version or '?'}, "
              f"temperature {g.temperature_c if g.temperature_c is not None else '?'} C, "
              f"utilisation {g.utilization_pct if g.utilization_pct is not None else '?'}%")
    return 0


def cmd_estimate(args) -> int:
    """Peak training memory of a model with given settings, item by item."""
    from .catalog import ArchitectureError, load_architecture
    from .estimator import estimate

    try:
        arch = load_architecture(args.model)
        result = estimate(
            arch, method=args.method, quant=args.quant, double_quant=args.double_quant, rank=args.rank,
            targets=args.targets, batch=args.batch, seq=args.seq, grad_checkpointing=args.grad_checkpointing,
            optimizer=args.optimizer, attention=args.attention,
        )
    except (ArchitectureError, ValueError) as e:
        raise UserError(str(e)) from e
    if args.gpus > 1:  # one process's share: a DDP replica or an FSDP shard (`parallel.per_process`)
        from .parallel import per_process

        result = per_process(result, arch, args.gpus, args.parallel)
    if args.json:
        _print_json(result.to_dict())
    else:
        print(result.table())
    return 0


def cmd_recommend(args) -> int:
    """The largest catalog model this card (detected, named or sized) trains with headroom (open ones first)."""
    from .recommend import recommend
    from .hardware import CPU_STATEMENT, close_gpu_names, find_gpu, probe_gpus

    if args.gpu:
        target = find_gpu(args.gpu)
        if target is None:
            close = close_gpu_names(args.gpu)
            hint = f" Closest: {', '.join(close)}." if close else ""
            raise UserError(f"unknown GPU {args.gpu!r}.{hint} Or give its memory with --vram-gb N.")
    elif args.vram_gb is not None:
        if args.vram_gb <= 0:
            raise UserError(f"--vram-gb must be positive, got {args.vram_gb}")
        target = int(args.vram_gb * 2**30)
    else:
        gpus, reason = probe_gpus()
        if not gpus:
            raise UserError(f"{CPU_STATEMENT} ({reason}). Plan for a card with --gpu NAME or --vram-gb N.")
        target = gpus[0]
    if args.seq <= 0:
        raise UserError(f"--seq must be positive, got {args.seq}")
    plan = recommend(target, seq=args.seq, prefer_open=not args.include_gated)
    if args.json:
        _print_json(plan.to_dict())
    else:
        print(plan.text())
    return 0


def add_plan_verbs(sub) -> None:
    from .estimator import ATTENTIONS, METHODS, OPTIMIZERS, QUANTS

    p = sub.add_parser("gpu", help="show the NVIDIA GPUs (or the CPU) this machine offers")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_gpu)

    p = sub.add_parser("estimate", help="estimate peak training memory of a model, item by item")
    p.add_argument("--model", required=True,
                   help="catalog name (Qwen2.5-7B), Hub id in the catalog, model folder or config.json")
    p.add_argument("--method", choices=METHODS, default="qlora")
    p.add_argument("--quant", choices=QUANTS, default=None,
                   help="base weights storage (default: nf4 for qlora, none for lora/full)")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize the 4-bit scales too (default: on)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--targets", choices=["attention", "all"], default="all",
                   help="LoRA on attention projections, or on all linear layers")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (padded)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in backward (default: on)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="paged_adamw_8bit")
    p.add_argument("--attention", choices=ATTENTIONS, default="sdpa")
    p.add_argument("--gpus", type=int, default=1, help="processes, one per GPU: the memory of each (default 1)")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                   help="with --gpus: a replica per GPU (ddp) or the model sharded (fsdp)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("recommend", help="the largest catalog model a card can train, and how")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--gpu", metavar="NAME", help="plan for a catalog card, e.g. 'RTX 3060' (default: the detected GPU)")
    which.add_argument("--vram-gb", type=float, metavar="N", help="plan for a card with N GB of memory (GB as cards are sold: GiB)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--include-gated", action="store_true",
                   help="rank gated models (Llama, Gemma, Mistral: accept the licence on the Hub first) by size "
                        "with the open ones (default: an open model whenever one fits)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_recommend)


# ---- troubleshooting: diagnose, fix


def _diagnose_target(target: str):
    """A run folder, a metrics.jsonl file, or a run name."""
    from pathlib import Path

    from .runs import RunError, resolve_run

    p = Path(target).expanduser()
    if p.exists():
        return p
    try:
        return resolve_run(target)
    except RunError as e:
        raise UserError(f"{target}: no such run folder, metrics file or run name") from e


def _print_findings(findings) -> None:
    if not findings:
        print("no findings: nothing looks wrong")
        return
    for f in findings:
        print(f"[{f.severity}] {f.kind} at step {f.step}: {f.message}")
        for i, fix in enumerate(f.fixes, 1):
            what = f" {json.dumps(fix.changes)}" if fix.changes else " (advice)"
            print(f"    fix {i}: {fix.title}{what}")


def cmd_diagnose(args) -> int:
    """Findings of a run (or a metrics.jsonl), each with fixes in the order to try them."""
    from .diagnose import diagnose_run

    findings = diagnose_run(_diagnose_target(args.run))
    if args.json:
        print(json.dumps({"findings": [f.to_dict() for f in findings]}, indent=2))
    else:
        _print_findings(findings)
    return 0


def _pick_finding(findings, kind: str | None):
    """The finding to act on: of the given kind if asked, else the most severe with a fix to apply."""
    from .finding import SEVERITIES

    candidates = [f for f in findings if any(x.actionable for x in f.fixes) and (kind is None or f.kind == kind)]
    if not candidates:
        what = f" of kind {kind}" if kind else ""
        raise UserError(f"no finding{what} with a fix to apply" + ("" if findings else ": nothing looks wrong"))
    return max(candidates, key=lambda f: SEVERITIES.index(f.severity))  # max keeps the earliest of a severity


def cmd_fix(args) -> int:
    """Apply a finding's fix: a new run with the changed settings, from the last good checkpoint."""
    from .diagnose import diagnose_run
    from .manager import get_manager

    folder = _diagnose_target(args.run)
    if folder.is_file():
        folder = folder.parent
    finding = _pick_finding(diagnose_run(folder), args.kind)
    if not 1 <= args.index <= len(finding.fixes):
        raise UserError(f"--index {args.index}: the {finding.kind} finding has fixes 1 to {len(finding.fixes)}")
    fix = finding.fixes[args.index - 1]
    if not fix.actionable:
        usable = [str(i) for i, f in enumerate(finding.fixes, 1) if f.actionable]
        raise UserError(f"fix {args.index} ({fix.title}) is advice, not a setting; fixes to apply: {', '.join(usable)}")
    print(f"{finding.kind} at step {finding.step}: {finding.message}")
    print(f"applying fix {args.index}: {fix.title} {json.dumps(fix.changes)}", flush=True)
    manager = get_manager()
    run = manager.apply_fix(folder, fix, reason=finding.message, echo=True)
    print(f"run folder: {run.path}", flush=True)
    return _finish_run(run, _wait_for(manager, run))


def add_diagnose_verbs(sub) -> None:
    p = sub.add_parser("diagnose", help="findings of a run (or metrics.jsonl), each with fixes")
    p.add_argument("run", metavar="RUN_OR_METRICS_JSONL", help="run name, run folder, or a metrics.jsonl file")
    p.add_argument("--json", action="store_true", help='print {"findings": [...]}')
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("fix", help="apply a finding's fix as a new run and train it (prints the run folder last)")
    p.add_argument("run", help="run name or folder")
    p.add_argument("--index", type=int, default=1, help="which fix of the finding, 1 = the first to try (default)")
    p.add_argument("--kind", choices=["oom", "nonfinite", "spike", "plateau", "overfitting", "underused", "data"],
                   help="act on the finding of this kind (default: the most severe one with a fix)")
    p.set_defaults(func=cmd_fix)
