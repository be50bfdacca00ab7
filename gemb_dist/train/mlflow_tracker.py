"""The MLflow tracker of rank 0 and of one-process jobs: a run with the resolved config, batched metrics,
system metrics (training), artifacts.

Training must outlive the tracking server: every call is retried with exponential backoff, then the tracker
goes on without the server, buffers metrics and other writes in order, tries to reconnect at a slow pace and
flushes the buffer once the server answers again. Only a server that is down when the run starts is fatal.
At the end of a run `close` waits up to `mlflow.flush_timeout_s` for the server; what is still undelivered is
saved to `<run>/mlflow_undelivered_metrics.jsonl` (read by `gemb mlflow sync`, `mlflow_sync.py`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import requests
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH
from pydantic import BaseModel

from gemb_dist.config import dump_config
from gemb_dist.train.tracking import flatten_params, is_http_uri

log = logging.getLogger(__name__)

MAX_BUFFERED_METRICS = 200_000  # about 40 MB of Metric objects; older points are dropped past this
UNDELIVERED_FILE = "mlflow_undelivered_metrics.jsonl"
RESUME_COUNT_TAG = "gemb.resume_count"
UNDELIVERED_COUNT_TAG = "gemb.undelivered_metrics"
UNDELIVERED_FILE_TAG = "gemb.undelivered_file"


def _is_transient(err: BaseException) -> bool:
    """Connection failures, timeouts and 5xx answers are worth retrying; a 4xx is a bug in what we sent."""
    if isinstance(err, MlflowException):
        return err.get_http_status_code() >= 500
    return isinstance(err, (OSError, requests.RequestException))


class MlflowTracker:
    """One MLflow run. Built by `build_tracker` (rank 0) or `job_tracker` once the server has answered.

    `config` is the job's whole config (logged as params and `config.yaml`); its `mlflow` section sets retries and
    timeouts. `run_dir` receives UNDELIVERED_FILE if the server never takes everything. System metrics are
    sampled every `system_metrics_interval_s` seconds when it is set (training).
    """

    def __init__(
        self,
        config: BaseModel,
        *,
        tracking_uri: str,
        run_dir: Path,
        run_name: str,
        tags: Mapping[str, str] | None = None,
        resume_run_id: str | None = None,
        system_metrics_interval_s: float | None = None,
    ) -> None:
        cfg = config.mlflow
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri
        self._retry_delays_s = [cfg.retry_backoff_s * 2**i for i in range(cfg.retries)]
        self._reconnect_every_s = cfg.retry_backoff_s * 2**cfg.retries
        self._metrics: list[Metric] = []
        self._ops: deque[tuple[str, Callable[[], None]]] = deque()
        self._offline_since: float | None = None
        self._next_reconnect = 0.0
        self._dropped_metrics = 0
        self._closed = False
        self._system_metrics = None
        self._system_metrics_interval_s = system_metrics_interval_s
        self._retry_backoff_s = cfg.retry_backoff_s
        self._flush_timeout_s = cfg.flush_timeout_s

        if is_http_uri(self.tracking_uri):
            # MLflow's own defaults (7 retries, 120 s timeout) would stall a training step for minutes;
            # this class retries on its own schedule instead. Explicit environment settings still win.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.request_timeout_s))
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.experiment_id = self._experiment_id(cfg.experiment)
        run_tags = {**cfg.tags, **(tags or {})}
        if resume_run_id:
            self.run_id = self._reopen_run(resume_run_id, run_tags, config)
        else:
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=run_tags).info.run_id
            self.log_params(config.model_dump(mode="json"))
            self._log_text(dump_config(config), "config.yaml")
        if system_metrics_interval_s is not None:
            self._start_system_metrics(resume=bool(resume_run_id))
        log.info("MLflow run %s at %s", self.run_id, self.run_url)

    # ----- the Tracker interface -----

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record one step's metrics, sent as one batch (the loop calls this every mlflow.log_every steps)."""
        timestamp_ms = int(time.time() * 1000)
        points = []
        for key, value in metrics.items():
            try:
                points.append(Metric(key, float(value), timestamp_ms, step))
            except (TypeError, ValueError):
                raise TypeError(f"metric {key!r} at step {step} is {type(value).__name__}, not a number") from None
        self._metrics.extend(points)
        if len(self._metrics) > MAX_BUFFERED_METRICS:
            excess = len(self._metrics) - MAX_BUFFERED_METRICS
            del self._metrics[:excess]
            self._dropped_metrics += excess
        self._drain()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested dicts are flattened to dotted keys; values are shortened to MLflow's limit."""
        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = items[start : start + MAX_PARAMS_TAGS_PER_BATCH]
            self._submit(f"{len(chunk)} params", lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))

    def log_artifact(self, path: str | Path, name: str | None = None) -> None:
        """Log a file or a directory (recursively) under the artifact folder `name` (the root when None)."""
        path = Path(path)
        if not path.exists():
            raise ValueError(f"cannot log artifact {path}: no such file or directory")
        if path.is_dir():
            self._submit(f"artifacts {path}", lambda: self.client.log_artifacts(self.run_id, str(path), name))
        else:
            self._submit(f"artifact {path}", lambda: self.client.log_artifact(self.run_id, str(path), name))

    def log_sentence_transformers(self, path: str | Path, name: str, metadata: Mapping[str, Any]) -> None:
        """The sentence-transformers model directory `path` as an MLflow model `name` of this run (loadable with
        `mlflow.sentence_transformers.load_model("models:/<model id>")`), with `metadata` in its MLmodel file."""
        path = Path(path)
        if not (path / "modules.json").is_file():
            raise ValueError(f"cannot log {path} as a sentence-transformers model: no modules.json")
        self._submit(f"model {name}", lambda: self._log_sentence_transformers(path, name, dict(metadata)))

    def close(self, status: str = "FINISHED") -> None:
        """Flush everything and end the run with `status` (FINISHED, FAILED or KILLED).

        A server that is down gets up to `mlflow.flush_timeout_s` to come back; then what is left (metrics and
        the end of the run) goes to UNDELIVERED_FILE and the run is tagged with the count and the file.
        """
        if self._closed:
            return
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"run status must be FINISHED, FAILED or KILLED, got {status!r}")
        self._closed = True
        self._stop_system_metrics()
        # Ending the run is the last queued write, so it waits for (and never overtakes) the buffered metrics.
        self._ops.append((f"end of run ({status})", lambda: self._terminate(status)))
        deadline = time.monotonic() + self._flush_timeout_s
        while True:
            self._drain(force=True, retries=[])
            remaining = deadline - time.monotonic()
            if not (self._metrics or self._ops) or remaining <= 0:
                break
            time.sleep(min(self._retry_backoff_s, remaining))
        if self._metrics or self._ops:
            self._save_undelivered(status)

    def _log_sentence_transformers(self, path: Path, name: str, metadata: dict[str, Any]) -> None:
        import mlflow.sentence_transformers
        from sentence_transformers import SentenceTransformer

        # The model flavour logs through MLflow's fluent API, which reads the process-wide tracking URI and
        # experiment (the logged model is created in that experiment, whatever run it names).
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_experiment(experiment_id=self.experiment_id)
        model = SentenceTransformer(str(path), device="cpu")
        mlflow.sentence_transformers.log_model(model, name=name, metadata=metadata, run_id=self.run_id)

    def _terminate(self, status: str) -> None:
        # `ray job stop` marks the run KILLED from the driver; a worker failing as a consequence must not
        # overwrite that with FAILED.
        if status == "FAILED" and self.client.get_run(self.run_id).info.status == "KILLED":
            return
        self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type else "FINISHED")

    @property
    def run_url(self) -> str | None:
        if not is_http_uri(self.tracking_uri):
            return None
        return f"{self.tracking_uri}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    @property
    def num_buffered_metrics(self) -> int:
        """Metric points waiting for the server (non-zero only during an outage)."""
        return len(self._metrics)

    # ----- run setup -----

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        # A sqlite store keeps artifacts beside its database; a server (or a file store) decides its own location.
        location = None
        if self.tracking_uri.startswith("sqlite:///"):
            database = Path(self.tracking_uri.removeprefix("sqlite:///"))
            location = (database.parent / "mlartifacts").resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException as err:  # another run created it first
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise err from None
            return experiment.experiment_id

    def _reopen_run(self, run_id: str, tags: Mapping[str, str], config: BaseModel) -> str:
        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            if _is_transient(err):
                raise
            raise ValueError(f"cannot resume MLflow run {run_id!r}: not found at {self.tracking_uri}") from None
        resumes = int(run.data.tags.get(RESUME_COUNT_TAG, "0")) + 1
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        self.run_id = run_id
        self._set_tags({**tags, RESUME_COUNT_TAG: str(resumes)})
        # MLflow params are write-once: keep the first values, record the new config beside the old one.
        old = run.data.params
        new = {k: v for k, v in flatten_params(config.model_dump(mode="json")).items() if k not in old}
        if new:
            self.log_params(new)
        self._log_text(dump_config(config), f"config_resume{resumes}.yaml")
        return run_id

    def _log_text(self, text: str, name: str) -> None:
        self._submit(f"artifact {name}", lambda: self.client.log_text(self.run_id, text, name))

    def _set_tags(self, tags: Mapping[str, str]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = items[start : start + MAX_PARAMS_TAGS_PER_BATCH]
            self._submit(f"{len(chunk)} tags", lambda chunk=chunk: self.client.log_batch(self.run_id, tags=chunk))

    def _start_system_metrics(self, resume: bool) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system_metrics = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=self._system_metrics_interval_s,
            resume_logging=resume,
            tracking_uri=self.tracking_uri,
        )
        self._system_metrics.start()

    def _stop_system_metrics(self) -> None:
        if self._system_metrics is not None:
            self._system_metrics.finish()
            self._system_metrics = None

    # ----- delivery: retries, offline buffering, reconnects -----

    def _submit(self, description: str, op: Callable[[], None]) -> None:
        if self._closed:
            raise RuntimeError(f"MLflow tracker of run {self.run_id} is closed; cannot log {description}")
        self._ops.append((description, op))
        self._drain()

    def _call(self, op: Callable[[], None], retries: list[float]) -> None:
        for delay in [*retries, None]:
            try:
                op()
                return
            except Exception as err:
                if not _is_transient(err) or delay is None:
                    raise
                time.sleep(delay)

    def _drain(self, force: bool = False, retries: list[float] | None = None) -> None:
        """Send buffered metrics and queued writes in order; on a transient failure go (or stay) offline."""
        offline = self._offline_since is not None
        if offline and not force and time.monotonic() < self._next_reconnect:
            return
        # Online, each call gets the full retry schedule; offline, one try per reconnect attempt.
        if retries is None:
            retries = self._retry_delays_s if (force or not offline) else []
        try:
            while self._metrics:
                chunk = self._metrics[:MAX_METRICS_PER_BATCH]
                self._call(lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk), retries)
                del self._metrics[: len(chunk)]
            while self._ops:
                _, op = self._ops[0]
                self._call(op, retries)
                self._ops.popleft()
        except Exception as err:
            if not _is_transient(err):
                raise
            self._go_offline(err)
            return
        if offline:
            self._back_online()

    def _go_offline(self, err: BaseException) -> None:
        self._next_reconnect = time.monotonic() + self._reconnect_every_s
        if self._offline_since is None:
            self._offline_since = time.monotonic()
            log.warning(
                "MLflow server %s is not answering (%s); training goes on, metrics are buffered and a reconnect "
                "is tried every %.0f s",
                self.tracking_uri,
                err,
                self._reconnect_every_s,
            )

    def _back_online(self) -> None:
        down_s = time.monotonic() - (self._offline_since or time.monotonic())
        self._offline_since = None
        log.warning("MLflow server %s is back after %.0f s; buffered metrics were delivered", self.tracking_uri, down_s)
        thread = getattr(self._system_metrics, "_process", None)
        if self._system_metrics is not None and (thread is None or not thread.is_alive()):
            # MLflow's monitor thread ends on its first failed request; start a new one that continues its steps.
            self._system_metrics = None
            self._start_system_metrics(resume=True)

    def _save_undelivered(self, status: str) -> None:
        """Append what the server never took to UNDELIVERED_FILE, one JSON object a line, each naming its run."""
        path = self.run_dir / UNDELIVERED_FILE
        pending = [description for description, _ in self._ops]
        ended = bool(pending) and pending[-1].startswith("end of run")
        lost = pending[:-1] if ended else pending
        with path.open("a") as f:
            for m in self._metrics:
                record = {
                    "run_id": self.run_id,
                    "key": m.key,
                    "value": m.value,
                    "step": m.step,
                    "timestamp": m.timestamp,
                }
                f.write(json.dumps(record) + "\n")
            for description in lost:  # artifacts and params are not replayable from a file; say what is missing
                f.write(json.dumps({"run_id": self.run_id, "lost": description}) + "\n")
            if ended:
                end = {"run_id": self.run_id, "end": status, "end_time": int(time.time() * 1000)}
                f.write(json.dumps({**end, "tracking_uri": self.tracking_uri}) + "\n")
                f.flush()
            os.fsync(f.fileno())
        num_metrics = len(self._metrics)
        dropped = (
            f"; {self._dropped_metrics} older points were dropped from the full buffer" if self._dropped_metrics else ""
        )
        log.warning(
            "MLflow server %s did not take everything within mlflow.flush_timeout_s=%.0f s: %d metric points%s "
            "saved to %s; deliver them with `gemb mlflow sync %s`; not replayable: %s%s",
            self.tracking_uri,
            self._flush_timeout_s,
            num_metrics,
            f" and the end of the run ({status})" if ended else "",
            path,
            self.run_dir,
            ", ".join(lost) or "nothing",
            dropped,
        )
        self._metrics.clear()
        self._ops.clear()
        try:  # one last try; `gemb mlflow sync` and the job driver tag the run later otherwise
            tags = [RunTag(UNDELIVERED_COUNT_TAG, str(num_metrics)), RunTag(UNDELIVERED_FILE_TAG, str(path))]
            self.client.log_batch(self.run_id, tags=tags)
        except Exception as err:
            if not _is_transient(err):
                raise
