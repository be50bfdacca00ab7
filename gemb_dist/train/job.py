"""The command line shared by the training jobs (`jobs/prefinetune.py`, `jobs/finetune.py`).

Everything that can be wrong with a submission (config, stage, run name, storage, data, MLflow) is found
here, on the driver, before any Ray worker starts.
"""

from __future__ import annotations

import argparse
import sys

from gemb_dist.config import ConfigError, GembConfig, dump_config
from gemb_dist.config_args import add_config_arguments, config_from_args

# Aliases only: each sets its field like a --set would; without them the config's values stand.
ALIASES = {"resume": "train.resume=true", "run_name": "train.run_name"}


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser, GembConfig)
    parser.add_argument("--resume", action="store_true", help="same as --set train.resume=true")
    parser.add_argument("--run-name", metavar="NAME", help="same as --set train.run_name=NAME")
    return parser.parse_args(argv)


def load_job_config(args: argparse.Namespace, stage: str) -> GembConfig:
    """The validated config of a `stage` job; packaged model references resolved to local paths."""
    from gemb_dist.train.packaged import resolve_packaged_models

    config = config_from_args(args, GembConfig, ALIASES)
    if config.train.stage != stage:
        raise ConfigError(f"{args.config}: train.stage is {config.train.stage!r}; this job runs {stage!r}")
    if stage == "finetune" and config.data.mode != "finetune":
        raise ConfigError(
            f"{args.config}: data.mode is {config.data.mode!r}; fine-tuning draws each global batch "
            "from one task: set data.mode=finetune"
        )
    return resolve_packaged_models(config)


def run_job(stage: str, argv: list[str] | None = None, description: str | None = None) -> int:
    """Parse, check on the driver, launch the Ray Train run, report where it went. Returns the exit code."""
    args = parse_args(argv, description)
    from gemb_dist.train.ray_trainer import launch, prepare_run

    try:
        run = prepare_run(load_job_config(args, stage))
    except (ValueError, ConnectionError) as err:
        print(f"{stage}: error: {err}", file=sys.stderr)
        return 2
    if run.local_tracking:  # first lines of the job log: a user looking at the MLflow UI would not find this run
        print(
            f"{stage}: WARNING: no MLflow tracking server set (mlflow.tracking_uri, $MLFLOW_TRACKING_URI in the "
            f"job's environment): this run logs to the local store {run.config.mlflow.tracking_uri}",
            file=sys.stderr,
            flush=True,
        )
    print(f"{stage}: run {run.config.train.run_name}, MLflow at {run.config.mlflow.tracking_uri}", flush=True)
    print(dump_config(run.config), flush=True)
    import ray

    from gemb_dist.train.mlflow_sync import deliver_at_end_of_job, mark_killed_on_stop

    if not ray.is_initialized():  # first: ray.init installs signal handlers of its own that would replace ours
        ray.init(address=run.config.ray.address)
    mark_killed_on_stop(run.config, run.run_dir)
    try:
        result = launch(run)
    except ValueError as err:  # found on the cluster before training (e.g. a node with other package versions)
        print(f"{stage}: error: {err}", file=sys.stderr)
        return 2
    print(f"{stage}: run {result.path} finished; metrics {result.metrics}", flush=True)
    deliver_at_end_of_job(run.run_dir)
    return 0
