"""The `gemb` command line: one entry point whose subcommands live beside the code they drive."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module exposing `register(subparsers)`; imported lazily so `gemb --help` stays fast.
SUBCOMMANDS = {
    "config": "gemb_dist.config_cli",
    "data": "gemb_dist.data.cli",
    "eval": "gemb_dist.evaluate.cli",
    "export": "gemb_dist.export",
    "mine": "gemb_dist.mining_cli",
    "mlflow": "gemb_dist.train.mlflow_sync",
    "plan": "gemb_dist.plan_cli",
    "synthesize": "gemb_dist.synthesize_cli",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemb", description="gemb-dist: distributed text-embedding training.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, module in SUBCOMMANDS.items():
        if wanted is None or name == wanted:
            importlib.import_module(module).register(subparsers)
        else:
            subparsers.add_parser(name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, ConnectionError) as err:  # bad input or an unreachable server: one clear line
        print(f"gemb {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
