"""The command line's verbs about a finished run's results: `export` (files to take home, verified) and
`eval` (did it learn the task?). Registered by `cli.build_parser` through `add_result_verbs`."""

from __future__ import annotations

import sys

from .cli import _print_json
from .metrics import METRICS


def cmd_export(args) -> int:
    """A run as files to take home (GGUF + Modelfile, GGUF, merged, adapter), verified; folder last."""
    from .export import export_run

    shown = [(-1, "")]

    def progress(fraction: float, message: str) -> None:  # a line per stage, or per 5% of one
        key = (int(fraction * 20), message.split(":")[0])
        if key != shown[-1]:
            shown.append(key)
            print(f"[{int(fraction * 100):3d}%] {message}", file=sys.stderr, flush=True)

    result = export_run(args.run, args.format, args.quant, args.output, progress=progress)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    v = result.verified
    if args.json:
        _print_json({"folder": str(result.folder), "files": result.files, "verified": v})
    else:
        print(f"{'verified' if result.ok else 'VERIFICATION FAILED'}: {v.get('summary')}")
        print(f"files: {', '.join(result.files)} ({result.seconds:.0f} s)")
        if result.ollama_create:
            print(f"to run it in Ollama: {result.ollama_create}")
        print(result.folder)
    return 0 if result.ok else 1


def _fmt_figure(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def print_eval(result: dict) -> None:
    """A task evaluation as a table: each figure for the fine-tuned and the base model; labels' confusion."""
    print(f"{result['run']}: {result['n']} prompts ({result['rows']} rows of {result['data']})")
    print(f"task {result['task']}, metric {result['metric']} (judged by {result['primary']}): {result['reason']}")
    base = result.get("base") or {}
    print(f"  {'':22s} {'fine-tuned':>10s} {'base':>10s}")
    for key, value in result["metrics"].items():
        if key != "n" and not isinstance(value, dict):
            print(f"  {key:22s} {_fmt_figure(value):>10s} {_fmt_figure(base.get(key)):>10s}")
    for label, row in (result["metrics"].get("per_label") or {}).items():
        print(f"  label {label!r}: {row['accuracy']:.0%} of {row['n']} (base "
              f"{_fmt_figure((base.get('per_label') or {}).get(label, {}).get('accuracy'))})")
    for label, row in (result["metrics"].get("confusion") or {}).items():
        print(f"  confusion {label!r} -> " + ", ".join(f"{k!r}: {v}" for k, v in row.items()))
    secs = result["seconds"]
    print(f"  generation: fine-tuned {secs['fine_tuned']:.1f} s, base "
          + ("skipped" if secs["base"] is None else f"{secs['base']:.1f} s" + (" (cached)" if secs["base_cached"] else "")))


def cmd_eval(args) -> int:
    from .taskeval import evaluate_run

    result = evaluate_run(args.run, data=args.data, metric=None if args.metric == "auto" else args.metric, db=args.db,
                          limit=args.limit, base=not args.no_base,
                          progress=lambda message: print(message, file=sys.stderr, flush=True))
    if args.json:
        _print_json(result)
    else:
        print_eval(result)
    return 0


def add_result_verbs(sub) -> None:
    from .export import DEFAULT_FORMAT, DEFAULT_QUANT, FORMATS, QUANTS

    x = sub.add_parser("export", help="export a run (GGUF + Ollama Modelfile, GGUF, merged, adapter), verified; "
                                      "prints the folder last (exit 1 if the verification fails)")
    x.add_argument("run")
    x.add_argument("--format", choices=FORMATS, default=DEFAULT_FORMAT, help=f"default {DEFAULT_FORMAT}")
    x.add_argument("--quant", choices=QUANTS, default=DEFAULT_QUANT, help=f"the GGUF's number format (default "
                   f"{DEFAULT_QUANT}; q4_k_m needs llama-cpp-python)")
    x.add_argument("--output", metavar="DIR", help="the export folder (default: exports/FORMAT-QUANT in the run)")
    x.add_argument("--json", action="store_true", help='print {"folder", "files", "verified"}')
    x.set_defaults(func=cmd_export)

    e = sub.add_parser("eval", help="did it learn the task? the fine-tuned and the base model's answers to held-out "
                                    "prompts, scored by the kind of answer")
    e.add_argument("run")
    e.add_argument("--data", help="an eval file (default: the run's test_data, else the rows it held out)")
    e.add_argument("--metric", default="auto", choices=["auto", *METRICS],
                   help="how answers are scored (default: auto, by the kind of answer)")
    e.add_argument("--db", help="the SQLite database the sql metric runs queries on (default: the run's eval_db; "
                                "the sample warehouse for task sql)")
    e.add_argument("--limit", type=int, help="only the first N prompts")
    e.add_argument("--no-base", action="store_true", help="skip the base model (its answers are cached per run and data)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)
