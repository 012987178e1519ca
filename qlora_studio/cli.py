"""Command line: one function per verb, each a thin call into the core.

Heavy libraries (torch, transformers) are imported inside the verbs that need them, so
``qlora-studio --help`` and the planning verbs answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys


class UserError(Exception):
    """A problem the user can fix; printed without a traceback, exit code 2."""


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---------------------------------------------------------------- verbs
# (each verb: a `cmd_<name>(args) -> int` and its parser in `build_parser`)


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
    if args.json:
        _print_json(result.to_dict())
    else:
        print(result.table())
    return 0


def cmd_recommend(args) -> int:
    """The largest catalog model this card (detected, named or sized) trains with headroom."""
    from .estimator import recommend
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
    plan = recommend(target, seq=args.seq)
    if args.json:
        _print_json(plan.to_dict())
    else:
        print(plan.text())
    return 0


def _add_plan_verbs(sub) -> None:
    p = sub.add_parser("gpu", help="show the NVIDIA GPUs (or the CPU) this machine offers")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_gpu)

    p = sub.add_parser("estimate", help="estimate peak training memory of a model, item by item")
    p.add_argument("--model", required=True,
                   help="catalog name (Qwen2.5-7B), Hub id in the catalog, model folder or config.json")
    p.add_argument("--method", choices=["qlora", "lora", "full"], default="qlora")
    p.add_argument("--quant", choices=["nf4", "fp4", "none"], default=None,
                   help="base weights storage (default: nf4 for qlora, none for lora/full)")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize the 4-bit scales too (default: on)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--targets", choices=["attention", "all"], default="attention",
                   help="LoRA on attention projections, or on all linear layers")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (padded)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in backward (default: on)")
    p.add_argument("--optimizer", choices=["paged_adamw_8bit", "adamw_8bit", "adamw_torch"], default="paged_adamw_8bit")
    p.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("recommend", help="the largest catalog model a card can train, and how")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--gpu", metavar="NAME", help="plan for a catalog card, e.g. 'RTX 3060' (default: the detected GPU)")
    which.add_argument("--vram-gb", type=float, metavar="N", help="plan for a card with N GB of memory (GB as cards are sold: GiB)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_recommend)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlora-studio", description="Fine-tune an open LLM with QLoRA, on one GPU or the CPU.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_plan_verbs(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
