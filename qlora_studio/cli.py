"""Command line: one function per verb, each a thin call into the core.

Heavy libraries (torch, transformers) are imported inside the verbs that need them, so
``qlora-studio --help`` and the planning verbs answer at once. Every problem the user can fix is a
`StudioError`, caught once in `main` (its message, exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys

from . import config as settings_schema
from .errors import StudioError


class UserError(StudioError):
    """A problem with the command line itself."""


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---------------------------------------------------------------- verbs
# (each verb: a `cmd_<name>(args) -> int` and its parser in `build_parser`)


def _config_from_args(args):
    """The run's `TrainConfig`: a preset or a config file, overridden by the flags given."""
    from .config import TrainConfig
    from .presets import load_config_file, load_preset

    overrides = settings_schema.flag_overrides(args)
    if args.preset:
        return load_preset(args.preset, overrides)
    if args.config:
        return load_config_file(args.config, overrides)
    return TrainConfig.from_dict(overrides, source="command line")


def _print_plan(cfg, as_json: bool) -> None:
    from .plan import plan_for

    plan = plan_for(cfg)
    if as_json:
        _print_json({"settings": cfg.to_dict(), "plan": plan.to_dict()})
        return
    print("\n".join(plan.lines()))


def _wait_for(manager, run) -> dict:
    """Wait for the manager's run in the foreground. Ctrl-C (SIGINT) or SIGTERM asks it to stop at the
    end of its step and save a checkpoint and the adapter; a second Ctrl-C abandons it (the run is then
    left "interrupted", resumable from its last checkpoint).

    The signals are handled by a handler that only sets the run's stop flag: a KeyboardInterrupt
    raised inside `Thread.join` would leave the thread marked as ended (Python 3.11), so the process
    would exit and kill the training thread before it saved anything.
    """
    import signal
    import threading

    received: list[int] = []

    def on_signal(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        print("\nstopping: saving a checkpoint and the adapter (Ctrl-C again to abandon)", file=sys.stderr, flush=True)
        manager.stop()

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_signal) for s in handled}
    try:
        while manager.active() is not None:
            manager.wait(0.5)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    status = manager.last_status or run.status(set())
    if received and status.get("state") == "stopped":
        status = dict(status, signal=received[0])
    return status


def _finish_run(run, status: dict) -> int:
    state = status.get("state")
    if state == "failed":
        print(f"run failed: {status.get('error')}", file=sys.stderr)
    print(run.path)
    if state == "stopped":
        return 128 + status.get("signal", 2)  # 130 after Ctrl-C, 143 after SIGTERM
    return 0 if state == "completed" else 1


def cmd_train(args) -> int:
    from .manager import get_manager

    cfg = _config_from_args(args)
    if args.dry_run:
        _print_plan(cfg, args.json)
        return 0
    manager = get_manager()
    run = manager.start(cfg, echo=True, allow_parallel=args.allow_parallel)
    print(f"run folder: {run.path}", flush=True)
    return _finish_run(run, _wait_for(manager, run))


def cmd_plan(args) -> int:
    """How a run of these settings would train here: every decision and why, and the memory estimate."""
    _print_plan(_config_from_args(args), args.json)
    return 0


def cmd_resume(args) -> int:
    from .manager import get_manager

    manager = get_manager()
    run = manager.resume(args.run, echo=True, allow_parallel=args.allow_parallel)
    return _finish_run(run, _wait_for(manager, run))


def cmd_data_check(args) -> int:
    from .data import DataError, check_file

    tokenizer = None
    if args.model:
        from .loading import load_tokenizer
        from .models import resolve_model

        tokenizer = load_tokenizer(resolve_model(args.model).path)
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
        print(f"{r.name:48s} {r.state:11s} loss {loss:>8s}  {r.model}  {r.data}" + ("  (resumable)" if r.resumable else "")
              + (f"  ({r.error})" if r.state == "damaged" else ""))
    return 0


def cmd_merge(args) -> int:
    from .chat import merge_run

    path = merge_run(args.run, progress=lambda f, m: print(f"[{int(f * 100):3d}%] {m}", flush=True), force=args.force)
    print(path)
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
    from .chat import load_run_model

    model, tok = load_run_model(args.run, base=args.base)
    if args.prompt is None:
        print("chat with the " + ("base" if args.base else "fine-tuned") + " model; an empty line or /quit ends it", file=sys.stderr)
    _chat_loop(model, tok, args.prompt, args.max_new_tokens, args.temperature)
    return 0


def cmd_demo(args) -> int:
    """The newcomer's path: train the cpu-demo preset, score it against the base, then chat."""
    from .manager import get_manager
    from .presets import load_preset
    from .taskeval import evaluate_run

    cfg = load_preset("cpu-demo", {"max_steps": args.max_steps})
    manager = get_manager()
    run = manager.start(cfg, echo=True)
    status = _wait_for(manager, run)
    if status.get("state") != "completed":
        return _finish_run(run, status)
    result = evaluate_run(run.path, limit=args.limit, progress=lambda message: print(message, flush=True))
    base, tuned = result["base"], result["metrics"]
    print(f"held-out execution accuracy: base {base['execution_accuracy']:.0%} -> fine-tuned {tuned['execution_accuracy']:.0%} "
          f"(exact match {base['exact_match']:.0%} -> {tuned['exact_match']:.0%}, {result['n']} questions)")
    print(f"run folder: {run.path}")
    if sys.stdin.isatty() and not args.no_chat:
        from .chat import load_run_model

        model, tok = load_run_model(run.path)
        print("ask for SQL over the warehouse (customers, products, orders, order items, regions); empty line ends")
        _chat_loop(model, tok, None, 128, 0.0)
    return 0


def _settings_parser(sub, name: str, help_text: str):
    """A verb that takes a run's settings: --preset or --config, then one flag per setting (from
    `config.SETTINGS`)."""
    t = sub.add_parser(name, help=help_text)
    src = t.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a shipped preset (e.g. cpu-demo; `qlora-studio presets` lists them)")
    src.add_argument("--config", help="a YAML/JSON file of settings")
    settings_schema.add_flags(t.add_argument_group("settings (each overrides the preset's or the file's)"))
    t.add_argument("--json", action="store_true", help="print the settings and the plan as JSON")
    return t


def _parallel_flag(parser) -> None:
    parser.add_argument("--allow-parallel", action="store_true",
                        help="train even while another process trains on the same device (each slower; "
                             "together they may not fit in memory)")


def cmd_presets(args) -> int:
    from .presets import list_presets

    for p in list_presets():
        print(f"{p.name:14s} {p.description}")
    return 0


def _add_run_verbs(sub) -> None:
    t = _settings_parser(sub, "train", "train a QLoRA adapter (prints the run folder last)")
    t.add_argument("--dry-run", action="store_true", help="print the plan and exit without training")
    _parallel_flag(t)
    t.set_defaults(func=cmd_train)
    p = _settings_parser(sub, "plan", "how a run would train here: every decision and why, and its memory")
    p.set_defaults(func=cmd_plan)
    ps = sub.add_parser("presets", help="list the shipped presets")
    ps.set_defaults(func=cmd_presets)

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
    _parallel_flag(rs)
    rs.set_defaults(func=cmd_resume)

    m = sub.add_parser("merge", help="merge a run's adapter into a 16-bit copy of its base")
    m.add_argument("run")
    m.add_argument("--force", action="store_true", help="merge again even if merged/ exists")
    m.set_defaults(func=cmd_merge)

    c = sub.add_parser("chat", help="talk to a run's fine-tuned (or --base) model")
    c.add_argument("run")
    c.add_argument("--prompt")
    c.add_argument("--base", action="store_true")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0)
    c.set_defaults(func=cmd_chat)

    dm = sub.add_parser("demo", help="train the cpu-demo preset, compare with the base model, then chat")
    dm.add_argument("--max-steps", type=int)
    dm.add_argument("--limit", type=int, help="score only the first N held-out questions")
    dm.add_argument("--no-chat", action="store_true")
    dm.set_defaults(func=cmd_demo)
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
    from .cli_advice import add_diagnose_verbs, add_plan_verbs
    from .cli_results import add_result_verbs
    from .job import add_job_verb

    p = argparse.ArgumentParser(prog="qlora-studio", description="Fine-tune an open LLM with QLoRA, on one GPU or the CPU.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_run_verbs(sub)
    add_plan_verbs(sub)
    add_diagnose_verbs(sub)
    add_result_verbs(sub)
    add_job_verb(sub, _settings_parser)
    _add_serve_verbs(sub)
    return p


def _output_closed() -> int:
    """The reader of our output went away (``qlora-studio runs | head -1``): stop quietly, as a shell
    tool does (exit 141 = 128 + SIGPIPE). Standard output is pointed at the null device so that the
    flush at exit does not fail again (Python's docs, "Note on SIGPIPE")."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no real file behind sys.stdout
        pass
    return 141


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away shows here rather than at exit
        return code
    except BrokenPipeError:
        return _output_closed()
    except StudioError as e:
        print(f"error: {e.user_text()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
