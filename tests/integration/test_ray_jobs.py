"""`ray job submit jobs/prefinetune.py` end to end: a real Ray head, a real MLflow server over HTTP, DeepSpeed ZeRO-3
on 2 CPU workers with the gradient cache, real tar shards of a learnable synthetic task.

One Ray head and one MLflow server serve the whole module; each test submits real jobs against them.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _services import mlflow_server, ray_head  # noqa: E402

from gemb_dist.data.build import build_shards  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
NUM_SAMPLES = 128  # 8 global batches of 16: one epoch of smoke_cpu.yaml
STEPS = 8
EXPERIMENT = "gemb-smoke"
WORDS = (
    "apple river mountain castle engine garden violin planet forest ocean silver rocket coffee window bridge tiger "
    "desert island marble candle harbor meadow thunder lantern falcon glacier orchard canyon velvet compass"
).split()

pytestmark = pytest.mark.slow


@dataclass
class Cluster:
    dashboard_url: str
    mlflow_uri: str
    shards: Path
    storage: Path
    sample_ids: set[str]


def write_learnable_pairs(path: Path) -> set[str]:
    """Each query's positive repeats its three topic words: learnable from the tokens, hard for a random model."""
    rng = random.Random(0)
    samples = []
    for i in range(NUM_SAMPLES):
        a, b, c = rng.sample(WORDS, 3)
        samples.append(
            {"id": f"s{i:04d}", "task": "pairs", "query": f"{a} {b} {c}", "positive": f"on {a}, {b} and {c}"}
        )
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return {s["id"] for s in samples}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_jobs")
    sample_ids = write_learnable_pairs(root / "pairs.jsonl")
    build_shards([str(root / "pairs.jsonl")], str(root / "shards"), samples_per_shard=48)
    with mlflow_server(root / "mlflow") as mlflow, ray_head(root / "ray", num_cpus=2) as head:
        yield Cluster(head.dashboard_url, mlflow.uri, root / "shards", root / "runs", sample_ids)


def submit(cluster: Cluster, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    """`ray job submit` of jobs/prefinetune.py with smoke_cpu.yaml pointed at this module's data and servers."""
    cmd = [
        RAY, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO), "--",
        "python", "jobs/prefinetune.py", "--config", "jobs/configs/smoke_cpu.yaml",
        "--set", f"data.shards={cluster.shards}", "--set", f"ray.storage_path={cluster.storage}",
        "--set", f"mlflow.tracking_uri={cluster.mlflow_uri}", *args,
    ]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def run_names(cluster: Cluster) -> set[str]:
    return {p.name for p in cluster.storage.iterdir()} if cluster.storage.exists() else set()


def mlflow_run(cluster: Cluster, run_name: str):
    from mlflow import MlflowClient

    client = MlflowClient(cluster.mlflow_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1, f"one MLflow run named {run_name}, found {len(runs)}"
    return client, runs[0]


def history(client, run, key: str) -> dict[int, float]:
    """step -> value; a step logged twice (replayed after a restart) keeps its last value."""
    values = {}
    for metric in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp):
        values[metric.step] = metric.value
    return values


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())


def consumed_samples(run_dir: Path) -> dict[tuple[int, int], list[dict]]:
    """(rank, step) -> every record the ranks wrote for that step, in the order written."""
    records = defaultdict(list)
    for path in sorted((run_dir / "samples").glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        for line in path.read_text().splitlines():
            record = json.loads(line)
            records[(rank, record["step"])].append(record)
    return records


@pytest.fixture(scope="module")
def smoke_run(cluster):
    run_name = f"smoke-{secrets.token_hex(3)}"
    proc = submit(cluster, "--run-name", run_name)
    assert proc.returncode == 0, output(proc)[-6000:]
    return run_name


def test_smoke_job_learns_logs_per_dim_metrics_and_exports_the_model(cluster, smoke_run):
    from gemb_dist.model import EmbeddingModel

    client, run = mlflow_run(cluster, smoke_run)
    assert run.info.status == "FINISHED"
    assert run.data.params["deepspeed.zero_stage"] == "3"
    assert json.loads(run.data.params["model.mrl_dims"]) == [16, 32]
    assert run.data.tags["stage"] == "prefinetune" and run.data.tags["data_manifest_sha256"]
    for key in (
        "loss_dim16",
        "loss_dim32",
        "accuracy_dim16",
        "accuracy_dim32",
        "lr",
        "grad_norm",
        "examples_per_s",
        "tokens_per_s",
        "time_encode_s",
        "time_backward_s",
        "time_optimizer_s",
        "bad_samples",
    ):
        assert sorted(history(client, run, key)) == list(range(1, STEPS + 1)), key
    loss = history(client, run, "loss")
    first, last = (loss[1] + loss[2]) / 2, (loss[STEPS - 1] + loss[STEPS]) / 2
    assert last < 0.8 * first, f"loss did not fall on a learnable task: {loss}"

    model = EmbeddingModel.load(cluster.storage / smoke_run / "model")  # consolidated from the ZeRO-3 shards
    assert model.config.mrl_dims == [16, 32]
    embeddings = model.embed(["apple river mountain", "on apple, river and mountain", "velvet compass glacier"])
    assert embeddings.shape == (3, 32)
    # the trained model ranks the matching positive above an unrelated text
    assert float(embeddings[0] @ embeddings[1]) > float(embeddings[0] @ embeddings[2])


def test_worker_failure_restarts_the_group_and_resumes_without_repeating_or_skipping(cluster, smoke_run):
    before = run_names(cluster)
    # no --run-name: a fresh, uniquely named run even though a run already exists in this storage
    proc = submit(cluster, "--set", "train.fault_injection.rank=1", "--set", "train.fault_injection.step=6")
    assert proc.returncode == 0, output(proc)[-6000:]
    (run_name,) = run_names(cluster) - before
    run_dir = cluster.storage / run_name
    assert (run_dir / "fault_injected_rank1_step6").exists(), "the fault never fired"

    records = consumed_samples(run_dir)
    assert {step for _, step in records} == set(range(1, STEPS + 1))
    assert records[(0, 1)][0]["resumed_from"] == 0, "a run without --resume starts from scratch"
    # the group was restarted from the checkpoint of step 4 and took steps 5..8 again
    for rank in (0, 1):
        for step in range(5, STEPS + 1):
            assert records[(rank, step)][-1]["resumed_from"] == 4, (rank, step, records[(rank, step)])
    # a replayed step consumed exactly the samples of its first attempt
    for key, attempts in records.items():
        assert all(a["ids"] == attempts[0]["ids"] for a in attempts), key
    consumed = [i for attempts in records.values() for i in attempts[-1]["ids"]]
    assert len(consumed) == len(set(consumed)) == NUM_SAMPLES and set(consumed) == cluster.sample_ids

    client, run = mlflow_run(cluster, run_name)  # the restarted workers reopened the same MLflow run
    assert run.info.status == "FINISHED"
    assert sorted(history(client, run, "loss")) == list(range(1, STEPS + 1))


def test_resubmitting_needs_resume_and_resume_continues_the_run(cluster, smoke_run):
    run_dir = cluster.storage / smoke_run
    checkpoints_before = checkpoints(run_dir)

    refused = submit(cluster, "--run-name", smoke_run, timeout=120)
    assert refused.returncode != 0
    assert "already exists" in output(refused) and "--resume" in output(refused)
    assert checkpoints(run_dir) == checkpoints_before, "a worker ran"

    proc = submit(
        cluster, "--resume", "--run-name", smoke_run, "--set", "train.epochs=2", "--set", "train.max_steps=10"
    )
    assert proc.returncode == 0, output(proc)[-6000:]
    records = consumed_samples(run_dir)
    assert {step for _, step in records} == set(range(1, 11))
    assert all(records[(rank, step)][-1]["resumed_from"] == STEPS for rank in (0, 1) for step in (9, 10))
    client, run = mlflow_run(cluster, smoke_run)
    assert sorted(history(client, run, "loss")) == list(range(1, 11))
    assert len(checkpoints(run_dir)) == 2, "train.keep_checkpoints=2"


def test_bad_config_fails_before_any_worker_starts_naming_the_field(cluster):
    before = run_names(cluster)
    proc = submit(cluster, "--set", "optimizer.lr=-1", timeout=120)
    assert proc.returncode != 0
    assert "optimizer.lr" in output(proc)
    assert "RayTrainWorker" not in output(proc)
    assert run_names(cluster) == before
