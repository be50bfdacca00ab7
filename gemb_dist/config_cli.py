"""`gemb config show`: print the fully resolved configuration of a job (file + overrides)."""

from __future__ import annotations

import argparse

from gemb_dist.config import dump_config, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="Validate a config and print it fully resolved.")
    parser.add_argument("--config", help="YAML config file (defaults when omitted).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0
