"""Delivering what a run's tracker could not: `gemb mlflow sync RUN_DIR`, and the driver's end-of-job marks.

The tracker saves what the server never took to `<run>/mlflow_undelivered_metrics.jsonl`. Syncing sends each
point the server does not already hold (matched on key, step and timestamp, so a second sync, or one after a
partial first, sends nothing twice), ends a run left RUNNING with the status it ended with, and tags the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gemb_dist.config import GembConfig
from gemb_dist.train.mlflow_tracker import UNDELIVERED_COUNT_TAG, UNDELIVERED_FILE, UNDELIVERED_FILE_TAG

log = logging.getLogger(__name__)

SYNCED_COUNT_TAG = "gemb.synced_metrics"
LOST_WRITES_TAG = "gemb.lost_writes"


@dataclass
class RunBacklog:
    """What one MLflow run is owed, read from the undelivered file."""

    run_id: str
    metrics: list[dict] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    end: dict | None = None
    tracking_uri: str | None = None


@dataclass
class SyncResult:
    run_id: str
    delivered: int  # points sent now
    already_there: int  # points the server held before (an earlier sync, or a write whose answer was lost)
    ended: str | None  # the status set now, None when the run was already ended


def read_backlog(path: Path) -> dict[str, RunBacklog]:
    """run id -> its backlog; a malformed line is a ValueError naming the file and line."""
    runs: dict[str, RunBacklog] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            run = runs.setdefault(record["run_id"], RunBacklog(record["run_id"]))
            if "key" in record:
                point = {k: record[k] for k in ("key", "value", "step", "timestamp")}
                point["value"] = float(point["value"])
                run.metrics.append(point)
            elif "lost" in record:
                run.lost.append(str(record["lost"]))
            elif "end" in record:
                run.end = {"status": record["end"], "end_time": int(record["end_time"])}
                run.tracking_uri = record.get("tracking_uri") or run.tracking_uri
            else:
                raise KeyError("key, lost or end")
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path}:{number}: not an undelivered-metrics record ({type(err).__name__}: {err})"
            ) from None
    return runs


def sync_run(backlog: RunBacklog, tracking_uri: str, source: Path) -> SyncResult:
    """Send one run's missing points, end it if it is still RUNNING, tag it; raises if the server is down."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(backlog.run_id)
    present: set[tuple[str, int, int]] = set()
    for key in {p["key"] for p in backlog.metrics}:
        present.update((key, m.step, m.timestamp) for m in client.get_metric_history(backlog.run_id, key))
    missing, seen = [], set()
    for p in backlog.metrics:
        identity = (p["key"], p["step"], p["timestamp"])
        if identity not in present and identity not in seen:
            seen.add(identity)
            missing.append(Metric(p["key"], p["value"], p["timestamp"], p["step"]))
    for start in range(0, len(missing), MAX_METRICS_PER_BATCH):
        client.log_batch(backlog.run_id, metrics=missing[start : start + MAX_METRICS_PER_BATCH])
    tags = [
        RunTag(UNDELIVERED_COUNT_TAG, "0"),
        RunTag(UNDELIVERED_FILE_TAG, str(source)),
        RunTag(SYNCED_COUNT_TAG, str(len({(p["key"], p["step"], p["timestamp"]) for p in backlog.metrics}))),
    ]
    if backlog.lost:
        tags.append(RunTag(LOST_WRITES_TAG, "; ".join(backlog.lost)[:5000]))
    client.log_batch(backlog.run_id, tags=tags)
    ended = None
    if backlog.end and run.info.status == "RUNNING":
        client.set_terminated(backlog.run_id, backlog.end["status"], end_time=backlog.end["end_time"])
        ended = backlog.end["status"]
    return SyncResult(backlog.run_id, len(missing), len(backlog.metrics) - len(missing), ended)


def sync_run_dir(run_dir: str | Path, tracking_uri: str | None = None) -> list[SyncResult]:
    """Deliver `<run_dir>/mlflow_undelivered_metrics.jsonl`; once all of it is delivered the file is renamed
    `*.synced-<ns>.jsonl`, so a second sync finds nothing to do. Returns one result per run in the file."""
    run_dir = Path(run_dir)
    path = run_dir / UNDELIVERED_FILE
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such run directory")
    if not path.is_file():
        return []
    results = []
    for backlog in read_backlog(path).values():
        uri = tracking_uri or backlog.tracking_uri
        if not uri:
            raise ValueError(f"{path}: run {backlog.run_id} names no tracking server; pass --tracking-uri")
        results.append(sync_run(backlog, uri.rstrip("/"), path))
    path.rename(path.with_name(f"{path.stem}.synced-{time.time_ns()}.jsonl"))
    return results


def deliver_at_end_of_job(run_dir: str | Path) -> None:
    """The job driver's last look: deliver a backlog the workers left if the server is back, else say loudly
    where it is and how to send it."""
    path = Path(run_dir) / UNDELIVERED_FILE
    if not path.is_file():
        return
    try:
        for result in sync_run_dir(run_dir):
            print(f"MLflow run {result.run_id}: {result.delivered} undelivered metric points sent now", flush=True)
    except Exception as err:  # noqa: BLE001 - the job itself succeeded; the backlog stays for a later sync
        print(
            f"WARNING: the MLflow server did not take every metric; they are in {path}: run `gemb mlflow sync "
            f"{run_dir}` once the server is back ({type(err).__name__}: {err})",
            flush=True,
        )


def mark_killed(tracking_uri: str, experiment: str, run_name: str) -> list[str]:
    """End the RUNNING MLflow run named `run_name` as KILLED (the job was stopped); returns the run ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs(
        [found.experiment_id], filter_string=f"attributes.run_name = '{run_name}' and attributes.status = 'RUNNING'"
    )
    for run in runs:
        client.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_id for run in runs]


def mark_killed_on_stop(config: GembConfig, run_dir: str | Path) -> None:
    """On the job driver: make SIGTERM/SIGINT (`ray job stop`) end the run's MLflow run as KILLED first.

    The workers are killed with the driver, too abruptly to end the run themselves; Ray gives the driver
    $RAY_JOB_STOP_WAIT_TIME_S (3 s by default) before SIGKILL, so this is a few quick HTTP calls, no retries.
    """
    from gemb_dist.train.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(config.mlflow, run_dir)
    experiment, run_name = config.mlflow.experiment, config.train.run_name

    def on_stop(signum, frame) -> None:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "2"
        try:
            ids = mark_killed(uri, experiment, run_name)
            print(
                f"stopped ({signal.Signals(signum).name}): MLflow run(s) {ids} of {run_name} marked KILLED", flush=True
            )
        except Exception as err:  # noqa: BLE001 - stopping goes on; the run just stays RUNNING in MLflow
            print(f"stopped: could not mark the MLflow run of {run_name} KILLED at {uri}: {err}", flush=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_stop)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("mlflow", help="MLflow housekeeping of training runs.")
    commands = parser.add_subparsers(dest="mlflow_command", required=True)
    sync = commands.add_parser(
        "sync", help="Deliver the metrics a run saved while its MLflow server was down (exactly once)."
    )
    sync.add_argument("run_dir", help="The run directory holding mlflow_undelivered_metrics.jsonl.")
    sync.add_argument("--tracking-uri", help="Server to deliver to (default: the one the run logged to).")
    sync.set_defaults(func=_sync)


def _sync(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    try:
        results = sync_run_dir(args.run_dir, args.tracking_uri)
    except (MlflowException, OSError) as err:  # requests' errors are OSErrors too
        print(f"gemb mlflow sync: cannot deliver {args.run_dir}: {err}", file=sys.stderr)
        return 1
    if not results:
        print(f"{args.run_dir}: nothing undelivered")
    for r in results:
        ended = f"; run ended {r.ended}" if r.ended else ""
        print(f"run {r.run_id}: {r.delivered} metric points delivered, {r.already_there} already there{ended}")
    return 0
