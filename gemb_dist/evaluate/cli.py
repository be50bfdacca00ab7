"""`gemb eval` and `jobs/evaluate.py`: score a model on STS, retrieval, classification, clustering and pair tasks at
each MRL dim. One command, two entry points; every setting is an EvalConfig field."""

from __future__ import annotations

import json

from gemb_dist.config_args import JobCommand
from gemb_dist.evaluate.runner import EvalConfig, run_evaluation


def evaluate(config: EvalConfig) -> int:
    """Evaluate (the table is printed as it is written), then print a JSON summary line."""
    results = run_evaluation(config)
    summary = {"out": config.out, "tasks": results["tasks"], "mlflow_run_id": results.get("mlflow_run_id")}
    print(json.dumps(summary), flush=True)
    return 0


COMMAND = JobCommand(
    EvalConfig,
    evaluate,
    help="Evaluate a model on MTEB-style tasks at each MRL dim, e.g. "
    "gemb eval --model DIR --out results.json --set sts=sts.csv --set 'dims=[64, 384]'.",
    aliases={"--model": "model", "--out": "out", "--no-ray": "ray_actors=0"},
    config_required=False,
)


def register(subparsers) -> None:
    COMMAND.register(subparsers, "eval")
