"""Experiment tracking behind one tiny interface, for every job: `log(metrics, step)`, `log_params`,
`log_artifact(path)`, `close()`.

`build_tracker` (training) and `job_tracker` (eval, soup, mining, synthesis) are the only places that decide who
logs and where: rank 0 of a training run gets an MLflow tracker, every other rank a no-op; a one-process job gets
an MLflow tracker when a tracking URI is configured, else a no-op. The MLflow side (server probing, retries,
buffering through outages) lives in `mlflow_tracker.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from gemb_dist.config import GembConfig, MLflowConfig, TrackedJobConfig, tracking_uri_problem

# MLflow's limits on one param (mlflow.utils.validation); longer values are shortened, the full config is
# always logged as a YAML artifact next to the params.
MAX_PARAM_KEY_CHARS = 250
MAX_PARAM_VALUE_CHARS = 6000
PROBE_TIMEOUT_S = 5.0
GIT_COMMIT_ENV = "GEMB_GIT_COMMIT"
JOB_TAG = "gemb.job"


class TrackingServerUnreachable(ConnectionError):
    """The MLflow tracking server did not answer at start; the message names the URI."""


@runtime_checkable
class Tracker(Protocol):
    """What a job may do with its run; implementations never raise for a transient outage."""

    run_id: str | None

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, name: str | None = None) -> None: ...

    def log_sentence_transformers(self, path: str | Path, name: str, metadata: Mapping[str, Any]) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...

    def __enter__(self) -> Tracker: ...

    def __exit__(self, exc_type, exc, tb) -> None: ...


class NullTracker:
    """The tracker of ranks and jobs that do not log: every call is accepted and dropped."""

    run_id: str | None = None
    run_url: str | None = None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        pass

    def log_sentence_transformers(self, path: str | Path, name: str, metadata: Mapping[str, Any]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type else "FINISHED")


def build_tracker(
    config: GembConfig,
    *,
    rank: int,
    run_dir: str | Path,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    resume_run_id: str | None = None,
) -> Tracker:
    """The tracker of one training process: MLflow on rank 0, a no-op elsewhere.

    Rank 0 starts (or, with `resume_run_id`, reopens) a run and logs the resolved config as params and as
    `config.yaml`. Raises TrackingServerUnreachable naming the URI when an HTTP server does not answer.
    """
    if rank != 0:
        return NullTracker()
    uri = resolve_tracking_uri(config.mlflow, run_dir)
    probe_tracking_server(uri)  # before importing mlflow, which takes seconds
    from gemb_dist.train.mlflow_tracker import MlflowTracker

    mlflow = config.mlflow
    return MlflowTracker(
        config,
        tracking_uri=uri,
        run_dir=Path(run_dir),
        run_name=run_name,
        tags=tags,
        resume_run_id=resume_run_id,
        system_metrics_interval_s=mlflow.system_metrics_interval_s if mlflow.system_metrics else None,
    )


def job_tracker(
    config: TrackedJobConfig, *, job: str, run_dir: str | Path, run_name: str, tags: Mapping[str, str] | None = None
) -> Tracker:
    """The tracker of a one-process job (eval, soup, mining, synthesis): one MLflow run tagged `gemb.job=<job>`
    when mlflow.tracking_uri or $MLFLOW_TRACKING_URI names a store, else a no-op. Opened before the job's work,
    so a server that does not answer fails the job at once, naming the URI."""
    uri = configured_tracking_uri(config.mlflow)
    if uri is None:
        return NullTracker()
    probe_tracking_server(uri)
    from gemb_dist.train.mlflow_tracker import MlflowTracker

    return MlflowTracker(
        config, tracking_uri=uri, run_dir=Path(run_dir), run_name=run_name, tags={JOB_TAG: job, **(tags or {})}
    )


def configured_tracking_uri(mlflow: MLflowConfig) -> str | None:
    """mlflow.tracking_uri, else $MLFLOW_TRACKING_URI (refused without a scheme, naming the variable), else None."""
    uri = mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    if problem := tracking_uri_problem(uri):
        raise ValueError(f"{'mlflow.tracking_uri' if mlflow.tracking_uri else '$MLFLOW_TRACKING_URI'}: {problem}")
    return uri.rstrip("/")


def resolve_tracking_uri(mlflow: MLflowConfig, run_dir: str | Path) -> str:
    """Training's store: the configured URI, else a sqlite store inside the run directory."""
    return configured_tracking_uri(mlflow) or f"sqlite:///{Path(run_dir).resolve()}/mlflow.db"


def is_http_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def probe_tracking_server(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail within `timeout_s` when an HTTP tracking server does not answer `GET /health`.

    Jobs call this on the driver too, so a wrong URI fails the job before any worker starts. Non-HTTP URIs
    (sqlite, file) need no server and pass.
    """
    if not is_http_uri(uri):
        return
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout_s) as response:
            if response.status != 200:
                raise TrackingServerUnreachable(f"MLflow tracking server {uri} answered /health with {response.status}")
    except (urllib.error.URLError, OSError) as err:
        if isinstance(err, TrackingServerUnreachable):
            raise
        reason = getattr(err, "reason", err)
        raise TrackingServerUnreachable(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it (cluster/local/start.sh) or point "
            "mlflow.tracking_uri / $MLFLOW_TRACKING_URI at a running server"
        ) from None


def log_report(tracker: Tracker, report: Mapping[str, Any], path: str | Path) -> None:
    """A data job's report: its numbers as metrics (step 0, dotted keys) and the report file as an artifact."""
    tracker.log(flatten_metrics(report), step=0)
    tracker.log_artifact(path)


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"section.field": "value"} within MLflow's key and value length limits."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        if len(text) > MAX_PARAM_VALUE_CHARS:
            text = text[: MAX_PARAM_VALUE_CHARS - 3] + "..."
        flat[name[:MAX_PARAM_KEY_CHARS]] = text
    return flat


def flatten_metrics(tree: Any, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested report (`{"judge": {"requests": 3}}` -> {"judge.requests": 3.0}); other leaves,
    booleans included, are left out."""
    flat: dict[str, float] = {}
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            flat.update(flatten_metrics(value, f"{prefix}{key}".replace("/", ".") + "."))
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        flat[prefix.rstrip(".")] = float(tree)
    return flat


def git_commit(repo_dir: str | Path | None = None) -> str | None:
    """The commit being trained: $GEMB_GIT_COMMIT (set by launchers whose working copy has no .git), else git."""
    if commit := os.environ.get(GIT_COMMIT_ENV):
        return commit
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def lineage_tags(stage: str, data_manifest_sha256: str | None = None, repo_dir: str | Path | None = None) -> dict:
    """Run tags linking a run to its code and data: stage, git commit, data manifest hash."""
    tags = {"stage": stage}
    if commit := git_commit(repo_dir):
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
    if data_manifest_sha256:
        tags["data_manifest_sha256"] = data_manifest_sha256
    return tags
