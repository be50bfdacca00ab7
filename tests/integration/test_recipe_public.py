"""`recipes/public/run.py --quick`: the whole public-data recipe at CI size against a real Ray head and a real MLflow
server: prepare, shards, the PCA-initialised start model, pre-finetuning and two fine-tuning Ray jobs (DeepSpeed
ZeRO-3 on gloo), mining with the pre-finetuned model, the greedy choice on the selection slices, uniform and greedy
soup jobs, the evaluation job for every model at one token limit, and the report table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared test helpers live in tests/

from _services import BIN_DIR, mlflow_server, ray_head  # noqa: E402
from test_projection_init import public_data  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODELS = ["base", "prefinetuned", "ft-a-s1", "ft-b-s1", "soup-uniform", "soup-greedy"]


def run_recipe(out: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "recipes/public/run.py"), "--quick", "--out", str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=1700, cwd=REPO)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # it ran past 15 minutes on a 2-core machine busy with other jobs
def test_quick_recipe_runs_end_to_end(tmp_path):
    data = public_data()
    if data is None:
        pytest.skip("the public data folder is not on this machine; set GEMB_PUBLIC_DATA")
    env = {**os.environ, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "quick"
    # A step whose input is missing names the step that makes it.
    early = run_recipe(out, "--data", str(data), "--steps", "mine", env=env)
    assert early.returncode != 0 and "made by the step 'shards'" in early.stderr, early.stderr[-2000:]
    with mlflow_server(tmp_path / "mlflow") as tracking, ray_head(tmp_path / "ray") as head:
        args = ["--data", str(data), "--ray-address", head.dashboard_url, "--mlflow-uri", tracking.uri]
        result = run_recipe(out, *args, env=env)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        import mlflow

        client = mlflow.MlflowClient(tracking.uri)
        experiment = client.get_experiment_by_name("gemb-recipe-public")
        names = {r.info.run_name for r in client.search_runs([experiment.experiment_id])}
        assert {"public-prefinetuned", "public-ft-a-s1", "public-ft-b-s1", "public-eval-soup-greedy"} <= names
    report = json.loads((out / "report.json").read_text())
    assert list(report["results"]) == MODELS
    for model in MODELS:
        tasks = report["results"][model]["tasks"]
        assert set(tasks) == {"sts", "retrieval", "classification", "pairs"}
        assert set(tasks["retrieval"]) == {"96", "192", "384"}
        assert report["results"][model]["max_length"] == 256  # every model scored at one token limit
    mined = json.loads((out / "shards/finetune_mined/mining_report.json").read_text())
    assert mined["num_samples_out"] == mined["num_samples_in"] > 0
    assert mined["num_extra_passages"] == {"scifact": 230}  # SciFact's own mining corpus, for its claims only
    greedy = json.loads((out / "soups/soup-greedy.json").read_text())
    assert greedy["selected"] and set(greedy["selected"]) <= {"ft-a-s1", "ft-b-s1"}
    table = (out / "report.md").read_text()
    assert all(f"| {m} |" in table for m in MODELS) and "jobs/evaluate.py --no-ray --config" in table
    # Fine-tuning changed the weights, and the uniform soup is the mean of its two ingredients.
    from safetensors.torch import load_file

    runs = ("ft-a-s1", "ft-b-s1")
    weights = {m: load_file(str(out / "runs" / f"public-{m}" / "model/model.safetensors")) for m in runs}
    soup = load_file(str(out / "runs/public-soup-uniform/model.safetensors"))
    key = "projection.weight"
    assert not (weights["ft-a-s1"][key] == weights["ft-b-s1"][key]).all()
    expected = (weights["ft-a-s1"][key] + weights["ft-b-s1"][key]) / 2
    assert (soup[key] - expected).abs().max() < 1e-6
