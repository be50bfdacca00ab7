"""`gemb synthesize` and `jobs/synthesize.py`: one command, two entry points (the Ray job calls `run` too)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from gemb_dist.config import dump_config, load_config
from gemb_dist.synthesize import REPORT_NAME, SynthesizeJobConfig, run_synthesis


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file of SynthesizeJobConfig")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="dotted override, e.g. --set llm.base_url=http://127.0.0.1:8000/v1")  # fmt: skip
    parser.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="log counters here")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("synthesize", help="Generate synthetic training shards with an LLM endpoint.")
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load and check the config, generate, write shards and the report, log counters, print a summary.
    Bad input raises ValueError (ConfigError included) for the entry point to print."""
    config = load_config(args.config, args.overrides, cls=SynthesizeJobConfig)
    print(dump_config(config), flush=True)
    report = run_synthesis(config)
    if args.mlflow_uri:
        import mlflow

        mlflow.set_tracking_uri(args.mlflow_uri)
        mlflow.set_experiment("gemb-dist-data")
        with mlflow.start_run(run_name=f"synthesize-{Path(config.output).name}"):
            mlflow.log_params({"input": config.input, "llm.model": config.llm.model, "tasks": len(config.tasks)})
            mlflow.log_metrics({f"llm.{k}": v for k, v in report["llm"].items()} | {"samples": report["num_samples"]})
            mlflow.log_artifact(str(Path(config.output) / REPORT_NAME))
    print(json.dumps({"samples": report["num_samples"], "output": config.output, "tasks": report["tasks"]}))
    return 0
