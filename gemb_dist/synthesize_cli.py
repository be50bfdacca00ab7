"""`gemb synthesize` and `jobs/synthesize.py`: one command, two entry points (the Ray job calls `run` too)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gemb_dist.config import dump_config
from gemb_dist.config_args import add_config_arguments, config_from_args
from gemb_dist.synthesize import REPORT_NAME, SynthesizeJobConfig, run_synthesis
from gemb_dist.train.tracking import job_tracker, log_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, SynthesizeJobConfig)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("synthesize", help="Generate synthetic training shards with an LLM endpoint.")
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load and check the config, generate, write shards and the report, log it, print a summary.
    Bad input raises ValueError (ConfigError included) for the entry point to print."""
    config = config_from_args(args, SynthesizeJobConfig)
    print(dump_config(config), flush=True)
    run_name = config.run_name or f"synthesize-{Path(config.output).name}"
    with job_tracker(config, job="synthesize", run_dir=config.output, run_name=run_name) as tracker:
        report = run_synthesis(config)
        log_report(tracker, report, Path(config.output) / REPORT_NAME)
    print(json.dumps({"samples": report["num_samples"], "output": config.output, "tasks": report["tasks"]}))
    return 0
