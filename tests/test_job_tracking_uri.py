"""The driver resolves the MLflow URI once and forwards it to the workers in the config; without a server it says
which local store the run falls back to."""

from __future__ import annotations

from pathlib import Path

from _data import make_dataset

from gemb_dist.config import load_config
from gemb_dist.train.ray_trainer import prepare_run

SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "smoke_cpu.yaml"


def _config(tmp_path: Path, *overrides: str):
    shards = make_dataset(tmp_path / "data", {"pairs": 20}, samples_per_shard=10)
    return load_config(str(SMOKE), [f"data.shards={shards}", f"ray.storage_path={tmp_path / 'runs'}", *overrides])


def test_without_a_server_the_run_falls_back_to_sqlite_in_its_run_dir_and_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = prepare_run(_config(tmp_path))
    assert run.local_tracking
    assert run.config.mlflow.tracking_uri == f"sqlite:///{run.run_dir.resolve()}/mlflow.db"


def test_the_drivers_environment_uri_is_forwarded_in_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/shared.db")  # a store every worker reaches
    run = prepare_run(_config(tmp_path))
    assert run.config.mlflow.tracking_uri == f"sqlite:///{tmp_path}/shared.db"
    assert not run.local_tracking
