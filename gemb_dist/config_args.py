"""The command line of every job and `gemb` command: `--config FILE` and `--set a.b=c` over one typed config root.

A command may add a few convenience flags, each nothing but an alias of a field: `--model DIR` is
`--set model=DIR`, `--no-ray` is `--set ray_actors=0`. Aliases are applied before the `--set` overrides, so an
explicit `--set` of the same field wins; without the alias the config file's value stands.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from gemb_dist.config import dump_config, load_config


def add_config_arguments(parser: argparse.ArgumentParser, root: type[BaseModel], *, required: bool = True) -> None:
    """`--config FILE` (the defaults of `root` when optional and omitted) and repeatable `--set FIELD=VALUE`."""
    optional = "" if required else "; defaults when omitted"
    parser.add_argument("--config", required=required, metavar="FILE", help=f"YAML file of {root.__name__}{optional}")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="dotted override of one field, value parsed as YAML (repeatable)",
    )


def alias_overrides(args: argparse.Namespace, aliases: Mapping[str, str]) -> list[str]:
    """`--set` items for the alias flags that were given. `aliases` maps an argparse dest to a field (`"model"`:
    the flag's value is the field's) or to a fixed assignment (`"ray_actors=0"`: set when the flag is given)."""
    items = []
    for dest, target in aliases.items():
        value = getattr(args, dest)
        if value is None or value is False:
            continue
        items.append(target if "=" in target else f"{target}={json.dumps(value)}")  # JSON is YAML: exact values
    return items


def config_from_args(args: argparse.Namespace, root: type[BaseModel], aliases: Mapping[str, str] | None = None):
    """The validated `root` config of a parsed command line; ConfigError names every bad field."""
    return load_config(args.config, [*alias_overrides(args, aliases or {}), *args.overrides], cls=root)


@dataclass(frozen=True)
class JobCommand:
    """A job that is both a `gemb` subcommand and a `jobs/*.py` entry point: the same flags, the same code.

    `aliases` maps a flag to the field it sets: `{"--model": "model"}` takes a value, `{"--no-ray": "ray_actors=0"}`
    is a switch. `execute` runs the loaded config and returns the exit code.
    """

    root: type[BaseModel]
    execute: Callable[[Any], int]
    help: str
    aliases: Mapping[str, str] = field(default_factory=dict)
    config_required: bool = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser, self.root, required=self.config_required)
        for flag, target in self.aliases.items():
            if "=" in target:
                parser.add_argument(flag, action="store_true", help=f"same as --set {target}")
            else:
                parser.add_argument(flag, metavar="VALUE", help=f"same as --set {target}=VALUE")

    def register(self, subparsers: argparse._SubParsersAction, name: str) -> None:
        parser = subparsers.add_parser(name, help=self.help, description=self.help)
        self.add_arguments(parser)
        parser.set_defaults(func=self.run)

    def run(self, args: argparse.Namespace) -> int:
        """Load and check the config (bad input raises ConfigError before any work), print it, execute it."""
        by_dest = {flag.lstrip("-").replace("-", "_"): target for flag, target in self.aliases.items()}
        config = config_from_args(args, self.root, by_dest)
        print(dump_config(config), flush=True)
        return self.execute(config)

    def main(self, argv: list[str] | None, name: str) -> int:
        """A `jobs/*.py` entry point: bad input or an unreachable server is one line on stderr and exit code 2."""
        parser = argparse.ArgumentParser(prog=f"jobs/{name}.py", description=self.help)
        self.add_arguments(parser)
        try:
            return self.run(parser.parse_args(argv))
        except (ValueError, ConnectionError) as err:
            print(f"{name}: error: {err}", file=sys.stderr)
            return 2
