"""`gemb mine` and `jobs/mine_negatives.py`: one command, two entry points."""

from __future__ import annotations

import json
from pathlib import Path

from gemb_dist.config_args import JobCommand
from gemb_dist.mining_pipeline import REPORT_NAME, MineJobConfig, run_mining
from gemb_dist.train.tracking import job_tracker, log_report


def mine(config: MineJobConfig) -> int:
    """Mine inside one tracked run, log the report, print a summary line."""
    run_name = config.run_name or f"mine-{Path(config.output).name}"
    with job_tracker(config, job="mine", run_dir=config.output, run_name=run_name) as tracker:
        report = run_mining(config)
        log_report(tracker, report, Path(config.output) / REPORT_NAME)
    summary = {"mined": report["num_samples_out"], "fewer_than_k": report["num_queries_fewer_than_k"]}
    if report.get("rerank"):
        summary["unjudged_queries"] = report["rerank"]["unjudged_queries"]
    print(json.dumps({**summary, "output": config.output, "mlflow_run_id": tracker.run_id}), flush=True)
    return 0


COMMAND = JobCommand(
    MineJobConfig,
    mine,
    help="Mine hard negatives: (query, positive) shards -> fine-tuning shards.",
    aliases={"--no-ray": "encoder.num_actors=0"},
)


def register(subparsers) -> None:
    COMMAND.register(subparsers, "mine")
