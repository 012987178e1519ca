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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlora-studio", description="Fine-tune an open LLM with QLoRA, on one GPU or the CPU.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    del sub  # verbs are added below as they land
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
