"""`gemb config show`: print the fully resolved configuration of a job (file + overrides)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from gemb_dist.config import dump_config, load_config

# Every config root: job or command -> the config class its YAML files validate against. A file's job is read
# from its name (soup_qwen.yaml -> soup); any other name is a training config (prefinetune, finetune, smoke).
SCHEMAS = {
    "train": "gemb_dist.config:GembConfig",
    "build_data": "gemb_dist.data.build_job:BuildDataConfig",
    "data_audit": "gemb_dist.data.audit:AuditConfig",
    "evaluate": "gemb_dist.evaluate.runner:EvalConfig",
    "export": "gemb_dist.export:ExportConfig",
    "mine_negatives": "gemb_dist.mining_pipeline:MineJobConfig",
    "soup": "gemb_dist.soup:SoupConfig",
    "synthesize": "gemb_dist.synthesize:SynthesizeJobConfig",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="Validate a config and print it fully resolved.")
    parser.add_argument("action", nargs="?", choices=["show"], default="show", help="show (the default)")
    parser.add_argument("--config", help="YAML config file (defaults when omitted).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--job", choices=sorted(SCHEMAS), help="whose config it is (default: from the file name)")
    parser.set_defaults(func=_show)


def schema(job: str) -> type:
    """The config class of `job` (a key of SCHEMAS)."""
    module, _, name = SCHEMAS[job].partition(":")
    return getattr(importlib.import_module(module), name)


def _schema(job: str | None, path: str | None) -> type:
    if job is None:
        stem = Path(path).stem if path else ""
        job = next((name for name in SCHEMAS if name != "train" and stem.startswith(name)), "train")
    return schema(job)


def _show(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.config, args.overrides, cls=_schema(args.job, args.config))), end="")
    return 0
