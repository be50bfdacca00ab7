"""`gemb mine` and `jobs/mine_negatives.py`: one command, two entry points (the Ray job calls `run` too)."""

from __future__ import annotations

import argparse
import json

from gemb_dist.config import dump_config, load_config
from gemb_dist.mining_pipeline import MineJobConfig, log_report_to_mlflow, run_mining


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file of MineJobConfig")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="dotted override, e.g. --set mining.top_k=50")  # fmt: skip
    parser.add_argument("--no-ray", action="store_true", help="embed in this process instead of Ray actors")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("mine", help="Mine hard negatives: (query, positive) shards -> fine-tuning shards.")
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load and check the config (a misspelled field fails here, before any work), mine, log, print a summary.
    Bad input raises ValueError (ConfigError included) for the entry point to print."""
    config = load_config(args.config, args.overrides, cls=MineJobConfig)
    print(dump_config(config), flush=True)
    if not args.no_ray:
        import ray

        ray.init()  # inside `ray job submit` this joins the job's cluster (RAY_ADDRESS)
    report = run_mining(config)
    logged = log_report_to_mlflow(report, config, _params(config))
    summary = {"mined": report["num_samples_out"], "fewer_than_k": report["num_queries_fewer_than_k"]}
    if report.get("rerank"):
        summary["unjudged_queries"] = report["rerank"]["unjudged_queries"]
    print(json.dumps({**summary, "output": config.output, "mlflow": logged}), flush=True)
    return 0


def _params(config: MineJobConfig) -> dict[str, str]:
    mining = config.mining.model_dump()
    params = {f"mining.{k}": str(v) for k, v in mining.items()}
    params.update({"input": config.input, "encoder": config.encoder.path, "rerank": str(config.rerank)})
    params["filter_pairs"] = str(config.filter_pairs)
    if config.judge is not None:
        params.update({"judge.model": config.judge.model, "judge.base_url": config.judge.base_url})
    return params
