"""Experiment tracking against a real `mlflow server` over HTTP, and the sqlite store used when no server is set."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml
from _services import free_port, mlflow_server

from gemb_dist.cli import main
from gemb_dist.config import GembConfig, build_config, dump_config
from gemb_dist.train.mlflow_sync import deliver_at_end_of_job, sync_run_dir
from gemb_dist.train.mlflow_tracker import UNDELIVERED_COUNT_TAG, UNDELIVERED_FILE
from gemb_dist.train.tracking import (
    NullTracker,
    TrackingServerUnreachable,
    build_tracker,
    flatten_params,
    lineage_tags,
    probe_tracking_server,
)


def make_config(uri: str | None, experiment: str, **mlflow_fields) -> GembConfig:
    fields = {"tracking_uri": uri, "experiment": experiment, "system_metrics": False, **mlflow_fields}
    return build_config({"mlflow": fields, "model": {"mrl_dims": [8, 16]}, "train": {"max_steps": 6}})


def metric_steps(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.fixture(autouse=True)
def _fast_mlflow_http(monkeypatch):
    # The tracker sets these process-wide defaults; set them here so they are undone after each test.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(server.uri)


def test_flatten_params_uses_dotted_keys_and_mlflow_limits():
    flat = flatten_params({"a": {"b": 1, "c": {"d": [1, 2]}, "e": {}}, "f": None, "g": "x" * 7000, "h": True})
    assert flat["a.b"] == "1"
    assert flat["a.c.d"] == "[1, 2]"
    assert flat["a.e"] == "{}"
    assert flat["f"] == "null"
    assert flat["h"] == "true"
    assert len(flat["g"]) == 6000 and flat["g"].endswith("...")


def test_other_ranks_get_a_tracker_that_touches_nothing(tmp_path):
    config = make_config("http://127.0.0.1:1", "never-created")  # would fail if anything tried to connect
    tracker = build_tracker(config, rank=1, run_dir=tmp_path, run_name="r", tags={})
    assert isinstance(tracker, NullTracker) and tracker.run_id is None
    tracker.log({"loss": 1.0}, step=1)
    tracker.close()
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_fails_at_once_naming_the_uri(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    start = time.monotonic()
    with pytest.raises(TrackingServerUnreachable, match=uri):
        build_tracker(make_config(uri, "e"), rank=0, run_dir=tmp_path, run_name="r", tags={})
    assert time.monotonic() - start < 5


def test_server_that_never_answers_fails_within_the_probe_timeout():
    with socket.socket() as listener:  # accepts connections (kernel backlog) but never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TrackingServerUnreachable, match=uri):
            probe_tracking_server(uri, timeout_s=1.0)
        assert time.monotonic() - start < 4


def test_without_uri_runs_go_to_sqlite_in_the_run_dir(tmp_path):
    from mlflow.tracking import MlflowClient

    config = make_config(None, "local")
    with build_tracker(config, rank=0, run_dir=tmp_path / "run", run_name="local-run", tags={"stage": "x"}) as tracker:
        tracker.log({"loss": 2.0}, step=1)
        with pytest.raises(TypeError, match="'loss' at step 2"):
            tracker.log({"loss": "high"}, step=2)
    db = tmp_path / "run" / "mlflow.db"
    assert db.is_file()
    client = MlflowClient(f"sqlite:///{db}")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "local-run"
    assert run.data.params["model.mrl_dims"] == "[8, 16]"
    assert metric_steps(client, tracker.run_id, "loss") == {1: 2.0}
    assert (tmp_path / "run" / "mlartifacts").is_dir()


@pytest.mark.slow
def test_run_has_params_config_artifact_tags_metrics_and_model(server, client, tmp_path):
    config = make_config(server.uri, "full", log_every=2, system_metrics=True, system_metrics_interval_s=0.5)
    tags = {**lineage_tags("prefinetune", data_manifest_sha256="abc123"), "git_commit": "deadbeef"}
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    tracker = build_tracker(config, rank=0, run_dir=tmp_path / "run", run_name="full-run", tags=tags)
    for step in (2, 4, 6):
        tracker.log({"loss/8": 1.0 / step, "loss/16": 2.0 / step, "lr": 1e-3}, step=step)
    time.sleep(1.5)  # a few system-metric samples
    tracker.log_artifact(model_dir, "model")
    tracker.close()

    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "full-run" and run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "prefinetune"
    assert run.data.tags["git_commit"] == "deadbeef"
    assert run.data.tags["data_manifest_sha256"] == "abc123"
    assert run.data.params["mlflow.log_every"] == "2"
    assert run.data.params["loss.temperature"] == str(config.loss.temperature)
    assert run.data.params["train.max_steps"] == "6"
    assert metric_steps(client, tracker.run_id, "loss/8") == {2: 0.5, 4: 0.25, 6: 1.0 / 6}
    assert set(metric_steps(client, tracker.run_id, "loss/16")) == {2, 4, 6}
    assert any(key.startswith("system/cpu") for key in run.data.metrics)
    config_yaml = Path(client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path)))
    assert config_yaml.read_text() == dump_config(config)
    assert yaml.safe_load(config_yaml.read_text())["mlflow"]["tracking_uri"] == server.uri
    assert [a.path for a in client.list_artifacts(tracker.run_id, "model")] == ["model/config.json"]


@pytest.mark.slow
def test_rank_one_logs_nothing_to_the_server(server, client, tmp_path):
    config = make_config(server.uri, "ranks")
    trackers = [build_tracker(config, rank=r, run_dir=tmp_path / "run", run_name="ranks", tags={}) for r in (0, 1)]
    for rank, tracker in enumerate(trackers):
        (tmp_path / f"rank{rank}.txt").write_text("text")
        tracker.log({f"from_rank{rank}": 1.0}, step=1)
        tracker.log_artifact(tmp_path / f"rank{rank}.txt")
        tracker.log_params({"rank": rank})
        tracker.close()
    runs = client.search_runs([client.get_experiment_by_name("ranks").experiment_id])
    assert [r.info.run_id for r in runs] == [trackers[0].run_id]
    assert set(runs[0].data.metrics) == {"from_rank0"}
    assert runs[0].data.params["rank"] == "0"
    assert {a.path for a in client.list_artifacts(trackers[0].run_id)} == {"config.yaml", "rank0.txt"}


@pytest.mark.slow
def test_resume_continues_the_same_run(server, client, tmp_path):
    config = make_config(server.uri, "resume")
    first = build_tracker(config, rank=0, run_dir=tmp_path / "run", run_name="resumable", tags={})
    first.log({"loss": 3.0}, step=1)
    first.close("FAILED")
    changed = config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 9})})
    second = build_tracker(
        changed, rank=0, run_dir=tmp_path / "run", run_name="ignored", tags={}, resume_run_id=first.run_id
    )
    assert second.run_id == first.run_id
    second.log({"loss": 2.0}, step=2)
    second.close()
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["gemb.resume_count"] == "1"
    assert run.data.params["train.max_steps"] == "6"  # params are write-once; the new config is an artifact
    assert metric_steps(client, first.run_id, "loss") == {1: 3.0, 2: 2.0}
    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert artifacts == {"config.yaml", "config_resume1.yaml"}
    with pytest.raises(ValueError, match=f"'no-such-run'.*{server.uri}"):
        build_tracker(config, rank=0, run_dir=tmp_path / "run", run_name="x", tags={}, resume_run_id="no-such-run")


@pytest.mark.slow
def test_training_outlives_a_server_outage(server, client, tmp_path, caplog):
    config = make_config(server.uri, "outage", retries=1, retry_backoff_s=0.2)  # reconnect every 0.4 s
    tracker = build_tracker(config, rank=0, run_dir=tmp_path / "run", run_name="outage", tags={})
    tracker.log({"loss": 1.0}, step=1)
    server.stop()
    try:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="gemb_dist.train.mlflow_tracker"):
            for step in (2, 3, 4):
                tracker.log({"loss": float(step)}, step=step)
            (tmp_path / "outage.txt").write_text("written while the server was down")
            tracker.log_artifact(tmp_path / "outage.txt")
        assert time.monotonic() - start < 5, "logging must not stall training while the server is down"
        assert any("not answering" in r.getMessage() and server.uri in r.getMessage() for r in caplog.records)
        assert tracker.num_buffered_metrics == 3
    finally:
        server.start()
    time.sleep(0.5)
    tracker.log({"loss": 5.0}, step=5)
    assert tracker.num_buffered_metrics == 0
    tracker.close()
    assert metric_steps(client, tracker.run_id, "loss") == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0}
    assert "outage.txt" in {a.path for a in client.list_artifacts(tracker.run_id)}
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def restart_later(server, delay_s: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), server.start()), daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_close_waits_up_to_the_flush_timeout_for_a_server_that_comes_back(server, client, tmp_path):
    config = make_config(server.uri, "flush", retries=0, retry_backoff_s=0.3, flush_timeout_s=120)
    tracker = build_tracker(config, rank=0, run_dir=tmp_path / "run", run_name="flush", tags={})
    tracker.log({"loss": 1.0}, step=1)
    server.stop()
    for step in (2, 3, 4):
        tracker.log({"loss": float(step)}, step=step)
    restarted = restart_later(server, 2.0)
    try:
        tracker.close()  # returns once the restarted server took everything
    finally:
        restarted.join()
    assert metric_steps(client, tracker.run_id, "loss") == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    assert len(client.get_metric_history(tracker.run_id, "loss")) == 4
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert not (tmp_path / "run" / UNDELIVERED_FILE).exists()


@pytest.mark.slow
def test_what_the_flush_timeout_leaves_is_tagged_and_synced_exactly_once(server, client, tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = make_config(server.uri, "sync", retries=0, retry_backoff_s=0.2, flush_timeout_s=1.0)
    tracker = build_tracker(config, rank=0, run_dir=run_dir, run_name="sync", tags={})
    tracker.log({"loss": 1.0, "lr": 0.1}, step=1)
    server.stop()
    try:
        for step in range(2, 7):
            tracker.log({"loss": float(step), "lr": 0.1}, step=step)
        start = time.monotonic()
        tracker.close()
        assert time.monotonic() - start < 10, "close must give up after mlflow.flush_timeout_s"
        backlog = run_dir / UNDELIVERED_FILE
        records = [json.loads(line) for line in backlog.read_text().splitlines()]
        assert sum("key" in r for r in records) == 10 and records[-1]["end"] == "FINISHED"
        assert main(["mlflow", "sync", str(run_dir)]) == 1  # still down: a clear error, the backlog kept
        assert server.uri in capsys.readouterr().err and backlog.exists()
        deliver_at_end_of_job(run_dir)  # the job driver's last look: says where the backlog is and what to run
        assert f"gemb mlflow sync {run_dir}" in capsys.readouterr().out and backlog.exists()
    finally:
        server.start()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "RUNNING" and metric_steps(client, tracker.run_id, "loss") == {1: 1.0}
    saved = backlog.read_text()

    assert main(["mlflow", "sync", str(run_dir)]) == 0
    assert "10 metric points delivered, 0 already there; run ended FINISHED" in capsys.readouterr().out
    expected = {step: float(step) for step in range(1, 7)}
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[UNDELIVERED_COUNT_TAG] == "0" and run.data.tags["gemb.synced_metrics"] == "10"
    assert str(backlog) == run.data.tags["gemb.undelivered_file"]

    assert main(["mlflow", "sync", str(run_dir)]) == 0  # twice: nothing left to send
    assert "nothing undelivered" in capsys.readouterr().out
    backlog.write_text(saved)  # a sync that delivered but died before renaming the file
    assert main(["mlflow", "sync", str(run_dir)]) == 0
    assert "0 metric points delivered, 10 already there" in capsys.readouterr().out
    assert metric_steps(client, tracker.run_id, "loss") == expected
    assert len(client.get_metric_history(tracker.run_id, "loss")) == 6
    assert len(client.get_metric_history(tracker.run_id, "lr")) == 6


def test_sync_names_the_file_and_line_of_a_bad_record(tmp_path):
    (tmp_path / UNDELIVERED_FILE).write_text('{"run_id": "r", "key": "loss", "value": 1, "step": 1, "timestamp": 5}\n{')
    with pytest.raises(ValueError, match=rf"{UNDELIVERED_FILE}:2: not an undelivered-metrics record"):
        sync_run_dir(tmp_path)
    with pytest.raises(ValueError, match="no such run directory"):
        sync_run_dir(tmp_path / "missing")
