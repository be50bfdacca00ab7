"""The command line of every job and `gemb` command: `--config FILE` and `--set a.b=c` over one typed config root.

A command may add a few convenience flags, each nothing but an alias of a field: `--model DIR` is
`--set model=DIR`, `--no-ray` is `--set ray_actors=0`. Aliases are applied before the `--set` overrides, so an
explicit `--set` of the same field wins; without the alias the config file's value stands.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping

from pydantic import BaseModel

from gemb_dist.config import load_config


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
