"""`gemb eval` and `jobs/evaluate.py`: score a model on STS, retrieval, classification, clustering and pair tasks at
each MRL dim. One command, two entry points (the Ray job calls `run` too); every setting is an EvalConfig field."""

from __future__ import annotations

import argparse
import json

from gemb_dist.config import dump_config
from gemb_dist.config_args import add_config_arguments, config_from_args
from gemb_dist.evaluate.runner import EvalConfig, run_evaluation

ALIASES = {"model": "model", "out": "out", "no_ray": "ray_actors=0"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, EvalConfig, required=False)
    parser.add_argument("--model", metavar="DIR", help="same as --set model=DIR")
    parser.add_argument("--out", metavar="FILE", help="same as --set out=FILE")
    parser.add_argument("--no-ray", action="store_true", help="same as --set ray_actors=0 (encode here)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="Evaluate a model on MTEB-style tasks at each MRL dim.",
        description="e.g. gemb eval --model DIR --out results.json --set sts=sts.csv --set 'dims=[64, 384]'",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load and check the config (a misspelled field fails here), evaluate, print the table and a JSON summary.
    Bad input raises ValueError (ConfigError included) for the entry point to print."""
    config = config_from_args(args, EvalConfig, ALIASES)
    print(dump_config(config), flush=True)
    results = run_evaluation(config)
    summary = {"out": config.out, "tasks": results["tasks"], "mlflow_run_id": results.get("mlflow_run_id")}
    print(json.dumps(summary), flush=True)
    return 0
