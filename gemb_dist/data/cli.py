"""`gemb data build` (jsonl/parquet -> tar shards + manifest) and `gemb data audit` (dry run of the data plan)."""

from __future__ import annotations

import argparse
import json
import sys

from gemb_dist.config import DataConfig, build_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="Build WebDataset shards and audit the training data plan.")
    commands = parser.add_subparsers(dest="data_command", required=True)

    build = commands.add_parser("build", help="Validate samples and write shard-%%06d.tar files plus manifest.json.")
    build.add_argument("--input", nargs="+", required=True, help="Input files: .jsonl, .jsonl.gz or .parquet.")
    build.add_argument("--output", required=True, help="Output directory (must not already hold a dataset).")
    build.add_argument("--samples-per-shard", type=int, default=10_000, help="Samples per shard (default 10000).")
    build.add_argument("--dedupe", action="store_true", help="Drop samples whose task and texts repeat earlier ones.")
    build.add_argument(
        "--skip-invalid", action="store_true", help="Skip invalid records and report counts instead of failing."
    )
    build.set_defaults(func=_build)

    audit = commands.add_parser("audit", help="Dry-run the exact plan the trainer follows; print one JSON object.")
    audit.add_argument("shards", help="Shard directory or manifest: path, file:// or s3://bucket/prefix.")
    audit.add_argument("--world-size", type=int, required=True, help="Ranks to simulate.")
    audit.add_argument("--num-workers", type=int, default=1, help="DataLoader workers per rank.")
    audit.add_argument("--batch-size", type=int, required=True, help="Global batch size (all ranks).")
    audit.add_argument("--mode", choices=["prefinetune", "finetune"], default="prefinetune")
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--epochs", type=int, default=1)
    audit.add_argument("--shuffle-buffer", type=int, default=None, help="Block size (default: data.shuffle_buffer).")
    audit.add_argument("--resume-after-steps", type=int, default=None, help="Also audit a run stopped and resumed.")
    audit.add_argument("--resume-world-size", type=int, default=None, help="World size of the resumed run.")
    audit.add_argument("--resume-num-workers", type=int, default=None, help="Workers per rank of the resumed run.")
    audit.add_argument(
        "--in-process", action="store_true", help="Run loader workers' code in this process (same plan, no forks)."
    )
    audit.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="Other data.* fields, e.g. --set max_bad_samples=10.",
    )
    audit.set_defaults(func=_audit)


def _build(args: argparse.Namespace) -> int:
    from gemb_dist.data.build import build_shards

    report = build_shards(args.input, args.output, args.samples_per_shard, args.dedupe, args.skip_invalid)
    for message in report.first_errors:
        print(f"skipped: {message}", file=sys.stderr)
    print(
        json.dumps(
            {
                "output": args.output,
                "num_samples": report.num_samples,
                "num_shards": report.num_shards,
                "tasks": report.tasks,
                "skipped_invalid": report.skipped_invalid,
                "duplicates_removed": report.duplicates_removed,
            }
        )
    )
    return 0


def _audit(args: argparse.Namespace) -> int:
    from gemb_dist.data.audit import run_audit

    fields = {
        "shards": args.shards,
        "mode": args.mode,
        "global_batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "seed": args.seed,
    }
    if args.shuffle_buffer is not None:
        fields["shuffle_buffer"] = args.shuffle_buffer
    data = build_config(fields, args.overrides, cls=DataConfig)
    result = run_audit(
        data,
        args.world_size,
        epochs=args.epochs,
        resume_after_steps=args.resume_after_steps,
        resume_world_size=args.resume_world_size,
        resume_num_workers=args.resume_num_workers,
        in_process=args.in_process,
    )
    print(json.dumps(result))
    return 0
