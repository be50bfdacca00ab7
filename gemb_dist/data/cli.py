"""`gemb data build` (jsonl/parquet -> tar shards + manifest) and `gemb data audit` (dry run of the data plan).

Both take `--config FILE` and `--set FIELD=VALUE` over their config (BuildDataConfig, AuditConfig); the few
convenience flags are aliases of fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from gemb_dist.config_args import add_config_arguments, config_from_args
from gemb_dist.data.audit import AuditConfig
from gemb_dist.data.build_job import BuildDataConfig

BUILD_ALIASES = {"input": "input", "output": "output"}
AUDIT_ALIASES = {"shards": "data.shards"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="Build WebDataset shards and audit the training data plan.")
    commands = parser.add_subparsers(dest="data_command", required=True)

    build = commands.add_parser(
        "build",
        help="Validate samples and write shard-%%06d.tar files plus manifest.json.",
        description="e.g. gemb data build --input pairs.jsonl --output shards --set samples_per_shard=512",
    )
    add_config_arguments(build, BuildDataConfig, required=False)
    build.add_argument("--input", nargs="+", metavar="FILE", help="same as --set 'input=[FILE, ...]'")
    build.add_argument("--output", metavar="DIR", help="same as --set output=DIR")
    build.set_defaults(func=_build)

    audit = commands.add_parser(
        "audit",
        help="Dry-run the exact plan the trainer follows; print one JSON object.",
        description="e.g. gemb data audit SHARDS --set world_size=8 --set data.global_batch_size=4096",
    )
    add_config_arguments(audit, AuditConfig, required=False)
    audit.add_argument("shards", nargs="?", help="same as --set data.shards=SHARDS")
    audit.set_defaults(func=_audit)


def _build(args: argparse.Namespace) -> int:
    from gemb_dist.data.build_job import build_dataset

    config = config_from_args(args, BuildDataConfig, BUILD_ALIASES)
    report = build_dataset(config)
    for message in report.first_errors:
        print(f"skipped: {message}", file=sys.stderr)
    fields = ("num_samples", "num_shards", "tasks", "skipped_invalid", "duplicates_removed")
    print(json.dumps({"output": config.output, **{k: v for k, v in dataclasses.asdict(report).items() if k in fields}}))
    return 0


def _audit(args: argparse.Namespace) -> int:
    from gemb_dist.data.audit import run_audit

    print(json.dumps(run_audit(config_from_args(args, AuditConfig, AUDIT_ALIASES))))
    return 0
