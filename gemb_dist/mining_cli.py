"""`gemb mine` and `jobs/mine_negatives.py`: one command, two entry points (the Ray job calls `run` too)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gemb_dist.config import dump_config
from gemb_dist.config_args import add_config_arguments, config_from_args
from gemb_dist.mining_pipeline import REPORT_NAME, MineJobConfig, run_mining
from gemb_dist.train.tracking import job_tracker, log_report

ALIASES = {"no_ray": "encoder.num_actors=0"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, MineJobConfig)
    parser.add_argument("--no-ray", action="store_true", help="same as --set encoder.num_actors=0 (embed here)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("mine", help="Mine hard negatives: (query, positive) shards -> fine-tuning shards.")
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load and check the config (a misspelled field fails here, before any work), mine, log, print a summary.
    Bad input raises ValueError (ConfigError included) for the entry point to print."""
    config = config_from_args(args, MineJobConfig, ALIASES)
    print(dump_config(config), flush=True)
    run_name = config.run_name or f"mine-{Path(config.output).name}"
    with job_tracker(config, job="mine", run_dir=config.output, run_name=run_name) as tracker:
        report = run_mining(config)
        log_report(tracker, report, Path(config.output) / REPORT_NAME)
    summary = {"mined": report["num_samples_out"], "fewer_than_k": report["num_queries_fewer_than_k"]}
    if report.get("rerank"):
        summary["unjudged_queries"] = report["rerank"]["unjudged_queries"]
    print(json.dumps({**summary, "output": config.output, "mlflow_run_id": tracker.run_id}), flush=True)
    return 0
