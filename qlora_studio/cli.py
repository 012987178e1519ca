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


def _train_overrides(args) -> dict:
    return {
        "model": args.model, "data": args.data, "epochs": args.epochs, "max_steps": args.max_steps,
        "batch_size": args.batch_size, "grad_accum": args.grad_accum, "max_seq_len": args.max_seq_len,
        "rank": args.rank, "targets": args.targets, "quant": args.quant, "learning_rate": args.learning_rate,
        "eval_fraction": args.eval_fraction, "name": args.output, "batching": args.batching,
        "attention": args.attention, "gradient_checkpointing": args.gradient_checkpointing,
    }


def _wait_for(manager, run) -> dict:
    """Wait for the manager's run in the foreground; Ctrl-C asks it to stop and save."""
    try:
        while manager.active() is not None:
            manager.wait(0.5)
    except KeyboardInterrupt:
        print("\nstopping: saving a checkpoint and the adapter (Ctrl-C again to abandon)", file=sys.stderr, flush=True)
        manager.stop()
        manager.wait()
    return manager.last_status or run.status(set())


def _finish_run(run, status: dict) -> int:
    state = status.get("state")
    if state == "failed":
        print(f"run failed: {status.get('error')}", file=sys.stderr)
    print(run.path)
    return 0 if state == "completed" else (130 if state == "stopped" else 1)


def cmd_train(args) -> int:
    from .manager import get_manager
    from .presets import ConfigError, load_config_file, load_preset
    from .runs import RunError
    from .training import TrainingError

    overrides = _train_overrides(args)
    try:
        if args.preset:
            cfg = load_preset(args.preset, overrides)
        elif args.config:
            cfg = load_config_file(args.config, overrides)
        else:
            from .training import TrainConfig

            cfg = TrainConfig.from_dict({k: v for k, v in overrides.items() if v is not None}, source="command line")
        manager = get_manager()
        run = manager.start(cfg, echo=True)
    except (ConfigError, TrainingError, RunError) as e:
        raise UserError(str(e)) from e
    print(f"run folder: {run.path}", flush=True)
    return _finish_run(run, _wait_for(manager, run))


def cmd_resume(args) -> int:
    from .manager import RunBusy, get_manager
    from .runs import RunError

    manager = get_manager()
    try:
        run = manager.resume(args.run, echo=True)
    except (RunBusy, RunError) as e:
        raise UserError(str(e)) from e
    return _finish_run(run, _wait_for(manager, run))


def cmd_data_check(args) -> int:
    from .data import DataError, check_file

    tokenizer = None
    if args.model:
        from .models import ModelError, resolve_model
        from .training import load_tokenizer

        try:
            tokenizer = load_tokenizer(resolve_model(args.model).path)
        except ModelError as e:
            raise UserError(str(e)) from e
    try:
        report = check_file(args.file, tokenizer, args.max_seq_len)
    except DataError as e:
        if args.json:
            _print_json({"usable": False, "error": str(e), "errors": [], "warnings": []})
        else:
            print(f"unusable: {e}", file=sys.stderr)
        return 2
    d = report.to_dict()
    d["usable"] = True
    if args.json:
        _print_json(d)
    else:
        print(f"{report.path}: format {report.format}, {report.usable} usable of {report.rows} rows")
        if report.truncated is not None:
            print(f"  truncated at {args.max_seq_len} tokens: {report.truncated}; token lengths {d['token_lengths']}")
        for issue in report.errors[:50]:
            print("  error   " + issue.format(report.path))
        for w in report.warnings:
            print("  warning " + w)
    return 0


def cmd_runs(args) -> int:
    from dataclasses import asdict

    from .manager import get_manager

    records = get_manager().runs()
    if args.json:
        _print_json([asdict(r) for r in records])
        return 0
    if not records:
        print("no runs yet")
    for r in records:
        loss = f"{r.final_loss:.4f}" if isinstance(r.final_loss, (int, float)) else "-"
        print(f"{r.name:48s} {r.state:11s} loss {loss:>8s}  {r.model}  {r.data}" + ("  (resumable)" if r.resumable else ""))
    return 0


def cmd_merge(args) -> int:
    from .chat import ChatError, merge_run
    from .runs import RunError

    try:
        path = merge_run(args.run, progress=lambda f, m: print(f"[{int(f * 100):3d}%] {m}", flush=True), force=args.force)
    except (ChatError, RunError) as e:
        raise UserError(str(e)) from e
    print(path)
    return 0


def cmd_eval(args) -> int:
    from .chat import ChatError
    from .evaluate import evaluate_run
    from .runs import RunError

    try:
        result = evaluate_run(args.run, base=args.base, limit=args.limit)
    except (ChatError, RunError, ValueError) as e:
        raise UserError(str(e)) from e
    if args.json:
        _print_json(result)
    else:
        print(f"{'base model' if args.base else 'fine-tuned'}: " + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items() if not isinstance(v, (list, dict))))
    return 0


def _chat_loop(model, tok, first: str | None, max_new_tokens: int, temperature: float) -> None:
    from .chat import stream_reply

    messages: list[dict] = []
    prompt = first
    while True:
        if prompt is None:
            try:
                prompt = input("you> ").strip()
            except EOFError:
                print()
                return
            if prompt in ("", "/quit", "/exit"):
                return
        messages.append({"role": "user", "content": prompt})
        shown = ""
        print("model> ", end="", flush=True)
        for text in stream_reply(model, tok, messages, max_new_tokens=max_new_tokens, temperature=temperature):
            print(text[len(shown):], end="", flush=True)
            shown = text
        print()
        messages.append({"role": "assistant", "content": shown})
        if first is not None:
            return
        prompt = None


def cmd_chat(args) -> int:
    from .chat import ChatError, load_run_model
    from .runs import RunError

    try:
        model, tok = load_run_model(args.run, base=args.base)
    except (ChatError, RunError) as e:
        raise UserError(str(e)) from e
    if args.prompt is None:
        print("chat with the " + ("base" if args.base else "fine-tuned") + " model; an empty line or /quit ends it", file=sys.stderr)
    _chat_loop(model, tok, args.prompt, args.max_new_tokens, args.temperature)
    return 0


def cmd_demo(args) -> int:
    """The newcomer's path: train the cpu-demo preset, score it against the base, then chat."""
    from .evaluate import evaluate_run
    from .manager import get_manager
    from .presets import load_preset

    cfg = load_preset("cpu-demo", {"max_steps": args.max_steps})
    manager = get_manager()
    run = manager.start(cfg, echo=True)
    status = _wait_for(manager, run)
    if status.get("state") != "completed":
        return _finish_run(run, status)
    base = evaluate_run(run.path, base=True)
    tuned = evaluate_run(run.path)
    print(f"held-out execution accuracy: base {base['execution_accuracy']:.0%} -> fine-tuned {tuned['execution_accuracy']:.0%} "
          f"(exact match {base['exact_match']:.0%} -> {tuned['exact_match']:.0%}, {tuned['n']} questions)")
    print(f"run folder: {run.path}")
    if sys.stdin.isatty() and not args.no_chat:
        from .chat import load_run_model

        model, tok = load_run_model(run.path)
        print("ask for SQL over the warehouse (customers, products, orders, order items, regions); empty line ends")
        _chat_loop(model, tok, None, 128, 0.0)
    return 0


def _add_run_verbs(sub) -> None:
    t = sub.add_parser("train", help="train a QLoRA adapter (prints the run folder last)")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a preset shipped with the package (e.g. cpu-demo)")
    src.add_argument("--config", help="a YAML/JSON file of settings")
    t.add_argument("--model", help="embedded | model folder | Hub id | .gguf file")
    t.add_argument("--data", help="training data (.jsonl .json .csv .parquet)")
    t.add_argument("--epochs", type=float)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--grad-accum", type=int)
    t.add_argument("--max-seq-len", type=int)
    t.add_argument("--rank", type=int)
    t.add_argument("--targets", choices=["attention", "all"])
    t.add_argument("--quant", choices=["nf4", "fp4", "none"])
    t.add_argument("--learning-rate", type=float)
    t.add_argument("--eval-fraction", type=float)
    t.add_argument("--batching", choices=["packed", "grouped", "padded"],
                   help="packed (default): no padding, where the model's attention allows it")
    t.add_argument("--attention", choices=["sdpa", "eager"], help="default: the faster one for the device")
    t.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on with a GPU, off on the CPU when the run fits in RAM without it")
    t.add_argument("--output", metavar="NAME", help="the run folder's name under the studio's runs/ (letters, digits, . _ -)")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("data", help="inspect training data")
    dsub = d.add_subparsers(dest="data_verb", required=True)
    dc = dsub.add_parser("check", help="detect the format and validate a data file (exit 2 if unusable)")
    dc.add_argument("file")
    dc.add_argument("--model", help="count truncation with this model's tokenizer and chat template")
    dc.add_argument("--max-seq-len", type=int, default=512)
    dc.add_argument("--json", action="store_true")
    dc.set_defaults(func=cmd_data_check)

    r = sub.add_parser("runs", help="list runs")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_runs)

    rs = sub.add_parser("resume", help="resume an interrupted or stopped run from its last checkpoint")
    rs.add_argument("run")
    rs.set_defaults(func=cmd_resume)

    m = sub.add_parser("merge", help="merge a run's adapter into a 16-bit copy of its base")
    m.add_argument("run")
    m.add_argument("--force", action="store_true", help="merge again even if merged/ exists")
    m.set_defaults(func=cmd_merge)

    e = sub.add_parser("eval", help="task evaluation of a run on its held-out data (SQL: execution accuracy)")
    e.add_argument("run")
    e.add_argument("--base", action="store_true", help="evaluate the base model instead")
    e.add_argument("--limit", type=int)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("chat", help="talk to a run's fine-tuned (or --base) model")
    c.add_argument("run")
    c.add_argument("--prompt")
    c.add_argument("--base", action="store_true")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0)
    c.set_defaults(func=cmd_chat)

    dm = sub.add_parser("demo", help="train the cpu-demo preset, compare with the base model, then chat")
    dm.add_argument("--max-steps", type=int)
    dm.add_argument("--no-chat", action="store_true")
    dm.set_defaults(func=cmd_demo)
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
    from .diagnose import SEVERITIES

    candidates = [f for f in findings if any(x.actionable for x in f.fixes) and (kind is None or f.kind == kind)]
    if not candidates:
        what = f" of kind {kind}" if kind else ""
        raise UserError(f"no finding{what} with a fix to apply" + ("" if findings else ": nothing looks wrong"))
    return max(candidates, key=lambda f: SEVERITIES.index(f.severity))  # max keeps the earliest of a severity


def cmd_fix(args) -> int:
    """Apply a finding's fix: a new run with the changed settings, from the last good checkpoint."""
    from .diagnose import diagnose_run
    from .manager import RunBusy, get_manager
    from .runs import RunError
    from .training import TrainingError

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
    try:
        run = manager.apply_fix(folder, fix, reason=finding.message, echo=True)
    except (RunBusy, RunError, TrainingError) as e:
        raise UserError(str(e)) from e
    print(f"run folder: {run.path}", flush=True)
    return _finish_run(run, _wait_for(manager, run))


def _add_diagnose_verbs(sub) -> None:
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

# ---- serve: the browser app

AUTH_ENV = "QLORA_STUDIO_AUTH"


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve_auth(host: str, share: bool, auth: str | None) -> tuple[str, str] | None:
    """The (user, password) to require, or None; refuses to expose the app without one.

    Anyone who can open the page can train on this machine's GPU, read the files it shows and delete
    runs, so the app listens on loopback only unless a password protects it.
    """
    pair = None
    if auth:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise UserError(f"--auth / {AUTH_ENV} must be user:password (both non-empty)")
        pair = (user, password)
    exposed = []
    if not _is_loopback(host):
        exposed.append(f"--host {host} makes the app reachable from other machines")
    if share:
        exposed.append("--share publishes the app on a public gradio.live link")
    if exposed and pair is None:
        raise UserError(
            "refusing to start: " + " and ".join(exposed) + ", and anyone who reaches it could train on this "
            f"machine, read its data and delete runs. Set a login with --auth user:password (or the {AUTH_ENV} "
            "environment variable, which keeps the password out of the process list), or leave --host at 127.0.0.1.")
    return pair


def cmd_serve(args) -> int:
    import os

    auth = serve_auth(args.host, args.share, args.auth or os.environ.get(AUTH_ENV))
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1-65535, got {args.port}")
    from .ui.app import serve

    try:
        serve(host=args.host, port=args.port, share=args.share, auth=auth)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e}); is another app using the port? Try --port") from e
    return 0


def _add_serve_verbs(sub) -> None:
    s = sub.add_parser("serve", help="start the browser app (http://127.0.0.1:7860)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--share", action="store_true", help="also publish a public gradio.live link (needs --auth)")
    s.add_argument("--auth", metavar="USER:PASSWORD",
                   help=f"require this login (or set {AUTH_ENV}); needed for a non-loopback --host or --share")
    s.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlora-studio", description="Fine-tune an open LLM with QLoRA, on one GPU or the CPU.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_run_verbs(sub)
    _add_plan_verbs(sub)
    _add_diagnose_verbs(sub)
    _add_serve_verbs(sub)
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
