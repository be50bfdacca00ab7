"""The one-process jobs (eval, synthesis; soup and mining in their own tests) log through the same tracker as
training, configured by the same `mlflow` section, against a real `mlflow server` over HTTP."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from _llm_double import LLMDouble
from _models import tiny_bert
from _services import free_port, mlflow_server
from pydantic import Field

from gemb_dist.cli import main as gemb
from gemb_dist.config import ConfigError, MLflowConfig, Section, build_config
from gemb_dist.train.tracking import JOB_TAG, NullTracker, configured_tracking_uri, job_tracker

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
STS = "sentence1,sentence2,score\na man plays guitar,a person plays a guitar,5\na cat sleeps,the market fell,0\n"


@pytest.fixture(autouse=True)
def _no_environment_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


def runs_of(server, experiment: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    found = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([found.experiment_id])}, client


def test_without_a_uri_a_job_logs_nothing(tmp_path):
    class Job(Section):
        mlflow: MLflowConfig = Field(default_factory=MLflowConfig)

    tracker = job_tracker(Job(), job="x", run_dir=tmp_path / "never", run_name="r")
    assert isinstance(tracker, NullTracker) and not (tmp_path / "never").exists()


def test_an_environment_uri_without_scheme_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "127.0.0.1:5000")
    with pytest.raises(ValueError, match=r"\$MLFLOW_TRACKING_URI: '127.0.0.1:5000' has no known scheme"):
        configured_tracking_uri(MLflowConfig())
    with pytest.raises(ConfigError, match="tracking_uri: .* no known scheme; use one of http://, https://"):
        build_config({"tracking_uri": "127.0.0.1:5000"}, cls=MLflowConfig)


def test_gemb_eval_logs_scores_table_and_plot(server, tmp_path, capsys):
    model = tiny_bert(0, [8, 32], vocab_size=30522)  # the MiniLM tokenizer's ids
    model.save(tmp_path / "model")
    (tmp_path / "sts.csv").write_text(STS)
    args = ["eval", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "eval" / "r.json")]
    args += ["--set", f"sts={tmp_path / 'sts.csv'}", "--set", "progress=false"]
    args += ["--set", f"mlflow.tracking_uri={server.uri}", "--set", "mlflow.experiment=jobs", "--set", "run_name=e1"]
    assert gemb(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    runs, client = runs_of(server, "jobs")
    run = runs["e1"]
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags[JOB_TAG] == "eval" and run.data.params["model"] == str(tmp_path / "model")
    assert run.data.params["scored_dims"] == "8,32"
    assert run.data.metrics["sts.spearman.dim32"] == summary["tasks"]["sts"]["32"]["spearman"]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval")} == {
        "eval/r.json",
        "eval/r.table.json",
        "eval/r.png",
    }
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_gemb_synthesize_logs_its_report(server, tmp_path, capsys):
    (tmp_path / "passages.txt").write_text("The heapq module pops the smallest element of a heap first.\n")
    with LLMDouble() as llm:
        args = ["synthesize", "--config", str(CONFIGS / "synthesize.yaml")]
        sets = [f"input={tmp_path / 'passages.txt'}", f"output={tmp_path / 'out'}", f"llm.base_url={llm.base_url}",
                f"llm.model={llm.model}", "llm.cache_path=null", f"mlflow.tracking_uri={server.uri}",
                "mlflow.experiment=jobs"]  # fmt: skip
        assert gemb([*args, *(a for s in sets for a in ("--set", s))]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    runs, client = runs_of(server, "jobs")
    run = runs["synthesize-out"]
    assert run.data.tags[JOB_TAG] == "synthesize" and run.info.status == "FINISHED"
    assert run.data.metrics["num_samples"] == summary["samples"] > 0
    assert run.data.metrics["llm.requests"] > 0
    assert run.data.params["llm.model"] == llm.model
    assert "synthesize_report.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_an_unreachable_server_fails_the_job_before_any_work(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    (tmp_path / "sts.csv").write_text(STS)
    args = ["eval", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "r.json")]
    start = time.monotonic()
    assert gemb([*args, "--set", f"sts={tmp_path / 'sts.csv'}", "--set", f"mlflow.tracking_uri={uri}"]) == 2
    assert f"MLflow tracking server {uri} is unreachable" in capsys.readouterr().err  # not the missing model
    assert time.monotonic() - start < 10 and not (tmp_path / "r.json").exists()
