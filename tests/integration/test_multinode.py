"""Several Ray nodes on one machine with S3 storage, and real faults: `cluster/local/start.sh` with RAY_WORKER_NODES=2
(a head and two raylets of 1 CPU each), a moto S3 server holding the shards and the run storage, the MLflow server
start.sh started. One training worker runs per node (`gemb_worker_node` resource).

Drills, each ending with the job SUCCEEDED, the MLflow run FINISHED with every step's metrics exactly once, every
sample consumed exactly once in the final attempt chain, and the per-step losses equal to an uninterrupted run's:
a Ray Train worker process SIGKILLed (its PID from `ray.util.state`), a whole worker node killed (its raylet and
everything under it) and brought back by start.sh, S3 throttling and dropped connections (a fault proxy in front of
the S3 server) while shards are read and a checkpoint is written, the checkpoint staging disk full (a real tmpfs),
then --resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import boto3
import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _fault_proxy import FaultProxy  # noqa: E402
from _services import BIN_DIR, free_port, stop_process_tree, wait_for_http  # noqa: E402

from gemb_dist.data.build import build_shards  # noqa: E402
from gemb_dist.train.checkpoint import CHECKPOINT_PREFIX  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RAY = str(BIN_DIR / "ray")
NUM_SAMPLES = 192  # 12 global batches of 16
STEPS = 12
BUCKET = "gemb-runs"
EXPERIMENT = "gemb-smoke"
WORDS = "apple river mountain castle engine garden violin planet forest ocean silver rocket coffee window".split()

pytestmark = pytest.mark.slow


@dataclass
class Cluster:
    env: dict[str, str]  # start.sh's environment (state dir, ports)
    state: Path
    mlflow_uri: str
    s3_env: dict[str, str]
    sample_ids: set[str]

    @property
    def storage(self) -> str:
        return f"s3://{BUCKET}/runs"


def _moto(root: Path):
    port = free_port()
    log_path = root / "moto.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(BIN_DIR / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
    wait_for_http(f"http://127.0.0.1:{port}/moto-api/", process, log_path, timeout_s=60)
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    moto, endpoint = _moto(root)
    s3_env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
              "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    rng = random.Random(0)
    with (root / "pairs.jsonl").open("w") as f:
        for i in range(NUM_SAMPLES):
            a, b, c = rng.sample(WORDS, 3)
            f.write(json.dumps({"id": f"s{i:04d}", "task": "pairs", "query": f"{a} {b} {c}",
                                "positive": f"on {a}, {b} and {c}"}) + "\n")  # fmt: skip
    build_shards([str(root / "pairs.jsonl")], str(root / "shards"), samples_per_shard=48)
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")  # fmt: skip
    s3.create_bucket(Bucket=BUCKET)
    for path in (root / "shards").iterdir():
        s3.upload_file(str(path), BUCKET, f"shards/{path.name}")
    state = root / "local"
    env = {
        **os.environ,
        "GEMB_LOCAL_DIR": str(state),
        "RAY_PORT": str(free_port()),
        "RAY_DASHBOARD_PORT": str(free_port()),
        "MLFLOW_PORT": str(free_port()),
        "RAY_NUM_CPUS": "1",  # the head runs drivers and Ray Train's controller; training goes to the nodes
        "RAY_WORKER_NODES": "2",
        "VENV": str(BIN_DIR.parent),
    }
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE"):
        env.pop(name, None)
    try:
        subprocess.run(["cluster/local/start.sh"], cwd=REPO, env=env, check=True, timeout=400)
        yield Cluster(env, state, f"http://127.0.0.1:{env['MLFLOW_PORT']}", s3_env, {f"s{i:04d}" for i in
                                                                                      range(NUM_SAMPLES)})  # fmt: skip
    finally:
        subprocess.run(["cluster/local/stop.sh"], cwd=REPO, env=env, timeout=240)
        stop_process_tree(moto)


def submit(
    cluster: Cluster, run_name: str, *args: str, wait: bool = True, s3_endpoint: str | None = None
) -> subprocess.CompletedProcess:
    """`ray job submit` of jobs/prefinetune.py the documented way (env.sh), shards and storage on S3 (at
    `s3_endpoint` when given, e.g. a fault proxy in front of the S3 server)."""
    s3_env = {**cluster.s3_env, **({"AWS_ENDPOINT_URL": s3_endpoint} if s3_endpoint else {})}
    runtime_env = json.dumps({"env_vars": s3_env})
    cmd = (
        f"source {cluster.state}/env.sh && {RAY} job submit {'' if wait else '--no-wait'} --working-dir . "
        f"--runtime-env-json '{runtime_env}' -- python jobs/prefinetune.py --config jobs/configs/smoke_cpu.yaml "
        f"--set data.shards=s3://{BUCKET}/shards --set ray.storage_path={cluster.storage} "
        f"--set train.max_steps={STEPS} --set ray.resources_per_worker.gemb_worker_node=1 "
        f"--run-name {run_name} " + " ".join(args)
    )
    return subprocess.run(["bash", "-c", cmd], cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=600)


def job_status(cluster: Cluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    token = (cluster.state / "ray_auth_token").read_text().strip()
    client = JobSubmissionClient(
        f"http://127.0.0.1:{cluster.env['RAY_DASHBOARD_PORT']}", headers={"Authorization": f"Bearer {token}"}
    )
    return str(client.get_job_status(job_id))


def wait_job(cluster: Cluster, job_id: str, timeout: float = 480) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job_status(cluster, job_id)
        if status.rsplit(".", 1)[-1] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status.rsplit(".", 1)[-1]
        time.sleep(1)
    raise TimeoutError(job_id)


def job_id_of(proc: subprocess.CompletedProcess) -> str:
    match = re.search(r"raysubmit_[A-Za-z0-9]+", proc.stdout + proc.stderr)  # the CLI colours it: ANSI codes around
    assert match, proc.stdout + proc.stderr
    return match.group(0)


def run_dir(run_name: str) -> Path:
    return Path(tempfile.gettempdir()) / "gemb-runs" / run_name  # local_run_dir of an s3:// storage


def wait_for_step(run_name: str, step: int, timeout: float = 300) -> None:
    log = run_dir(run_name) / "samples" / "rank0.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and any(json.loads(line)["step"] >= step for line in log.read_text().splitlines() if line):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{run_name} never reached step {step}")


def consumed(run_name: str) -> dict[tuple[int, int], list[dict]]:
    records = defaultdict(list)
    for path in sorted((run_dir(run_name) / "samples").glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        for line in path.read_text().splitlines():
            record = json.loads(line)
            records[(rank, record["step"])].append(record)
    return records


def assert_exactly_once(cluster: Cluster, run_name: str, baseline: dict[int, float] | None) -> dict[int, float]:
    """FINISHED MLflow run, each step's loss logged once, every sample once in the final attempt chain, the
    losses of an uninterrupted run (when given)."""
    from mlflow import MlflowClient

    client = MlflowClient(cluster.mlflow_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    assert run.info.status == "FINISHED"
    for key in ("loss", "lr", "grad_norm", "loss_dim16"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(1, STEPS + 1)), f"{key}: steps logged {steps}"
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    records = consumed(run_name)
    assert {step for _, step in records} == set(range(1, STEPS + 1))
    for key, attempts in records.items():  # a replayed step consumed exactly the samples of its first attempt
        assert all(a["ids"] == attempts[0]["ids"] for a in attempts), key
    final = [i for attempts in records.values() for i in attempts[-1]["ids"]]
    assert len(final) == len(set(final)) == NUM_SAMPLES and set(final) == cluster.sample_ids
    if baseline is not None:
        for step, value in baseline.items():
            assert loss[step] == pytest.approx(value, rel=1e-5, abs=1e-6), f"step {step}: {loss[step]} vs {value}"
    return loss


def run_metric(cluster: Cluster, run_name: str, key: str) -> dict[int, float]:
    from mlflow import MlflowClient

    client = MlflowClient(cluster.mlflow_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


def s3_client(cluster: Cluster):
    return boto3.client("s3", endpoint_url=cluster.s3_env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip


def s3_keys(cluster: Cluster, prefix: str) -> list[str]:
    pages = s3_client(cluster).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def wait_for_registered_checkpoint(cluster: Cluster, run_name: str, timeout: float = 300) -> None:
    """Until Ray Train's controller has registered a checkpoint of the run: its checkpoint manager writes a snapshot
    naming the latest one into the run's storage. A checkpoint is registered only once the controller has polled
    every worker's report (every 2 s, slower on a loaded machine), so a rank lost between its report and that poll
    restarts the run from scratch: correct, but not the resume these drills are about."""
    s3, key = s3_client(cluster), f"runs/{run_name}/checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            snapshot = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        except s3.exceptions.NoSuchKey:
            snapshot = {}
        if snapshot.get("latest_checkpoint_result"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{run_name}: Ray Train registered no checkpoint in {timeout} s ({key})")


STATE_QUERY = """import json, os
from ray.util.state import list_actors
alive = [("state", "=", "ALIVE")]
actors = list_actors(os.environ["RAY_API_SERVER_ADDRESS"], filters=alive, limit=1000, raise_on_missing_output=False)
print(json.dumps([{"pid": a.pid, "node_id": a.node_id} for a in actors if "RayTrainWorker" in a.class_name]))"""


def train_workers(cluster: Cluster) -> list[dict]:
    """The alive Ray Train worker actors (pid, node), from Ray's state API, asked the way a user would (env.sh:
    the cluster's address and token)."""
    cmd = f"source {cluster.state}/env.sh && {sys.executable} -c '{STATE_QUERY}'"
    proc = subprocess.run(["bash", "-c", cmd], env=cluster.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def baseline(cluster):
    """An uninterrupted run: its losses are what every drill must reproduce."""
    run_name = f"base-{secrets.token_hex(3)}"
    proc = submit(cluster, run_name)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return run_name, assert_exactly_once(cluster, run_name, None)


def test_runs_one_worker_per_node_with_checkpoints_and_model_on_s3(cluster, baseline):
    run_name, _ = baseline
    keys = s3_keys(cluster, f"runs/{run_name}/")
    checkpoints = sorted({k.split("/")[2] for k in keys if "/checkpoint_step" in k})
    assert checkpoints == ["checkpoint_step00000008", "checkpoint_step00000012"], "keep_checkpoints=2"
    for name in checkpoints:
        assert f"runs/{run_name}/{name}/manifest.json" in keys
    assert any(k.endswith("/model/model.safetensors") or k.endswith(".safetensors") and "/model/" in k for k in keys)
    log = (cluster.state / "ray_node1.log").read_text() + (cluster.state / "ray_node2.log").read_text()
    assert "Ray runtime started" in log or log  # both nodes started through start.sh
    nodes = {r["node"] for r in _worker_nodes(run_name)}
    assert len(nodes) == 2, f"the two ranks ran on {nodes}"


def _worker_nodes(run_name: str) -> list[dict]:
    path = run_dir(run_name) / "nodes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sigkill_of_a_train_worker_resumes_exactly(cluster, baseline):
    run_name = f"kill-{secrets.token_hex(3)}"
    job_id = job_id_of(submit(cluster, run_name, wait=False))
    wait_for_step(run_name, 6)
    wait_for_registered_checkpoint(cluster, run_name)
    (victim, *_) = [a for a in train_workers(cluster) if a["pid"]]
    os.kill(victim["pid"], signal.SIGKILL)
    assert wait_job(cluster, job_id) == "SUCCEEDED"
    records = consumed(run_name)
    assert any(r["resumed_from"] >= 4 for attempts in records.values() for r in attempts), "no restart happened"
    assert_exactly_once(cluster, run_name, baseline[1])


def test_loss_of_a_worker_node_waits_for_it_and_resumes_exactly(cluster, baseline):
    run_name = f"node-{secrets.token_hex(3)}"
    # Each attempt to start a group without the node's resources times out and counts as a failure: leave room.
    job_id = job_id_of(submit(cluster, run_name, "--set ray.max_failures=8", wait=False))
    wait_for_step(run_name, 6)
    wait_for_registered_checkpoint(cluster, run_name)
    pidfile = cluster.state / "ray_node2.pid"
    node = psutil.Process(int(pidfile.read_text()))
    tree = [node, *node.children(recursive=True)]
    for process in tree:  # the raylet and everything under it, at once: a lost machine
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)
    time.sleep(5)
    # Ray Train cannot place 2 workers on one 1-CPU node: it waits for the resources; start.sh brings node 2 back
    subprocess.run(["cluster/local/start.sh"], cwd=REPO, env=cluster.env, check=True, timeout=300)
    assert wait_job(cluster, job_id) == "SUCCEEDED"
    records = consumed(run_name)
    assert any(r["resumed_from"] >= 4 for attempts in records.values() for r in attempts), "no restart happened"
    assert_exactly_once(cluster, run_name, baseline[1])


def test_s3_throttling_and_dropped_connections_while_reading_and_checkpointing_are_retried(cluster, baseline):
    """The S3 server answers 503 SlowDown for 3 s from the first shard read, then drops connections for 3 s from the
    first checkpoint upload: botocore (reads) and the AWS SDK under pyarrow (Ray Train's checkpoint writes) retry
    with backoff, nothing is counted bad, no worker restarts, and every checkpoint is complete."""
    run_name = f"s3-{secrets.token_hex(3)}"
    with FaultProxy(cluster.s3_env["AWS_ENDPOINT_URL"]) as proxy:
        proxy.arm("slowdown", 3.0, "GET", ".tar")
        proxy.arm("reset", 3.0, "PUT", f"/{run_name}/{CHECKPOINT_PREFIX}")
        proc = submit(cluster, run_name, s3_endpoint=proxy.endpoint)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    hit = dict(proxy.methods)
    assert hit.get(("slowdown", "GET"), 0) >= 1, f"no shard read was throttled: {hit}"
    assert hit.get(("reset", "PUT"), 0) >= 1, f"no checkpoint upload was dropped: {hit}"
    records = consumed(run_name)
    assert all(r["resumed_from"] == 0 for attempts in records.values() for r in attempts), "a worker restarted"
    assert_exactly_once(cluster, run_name, baseline[1])
    assert set(run_metric(cluster, run_name, "bad_samples").values()) == {0.0}, "a fault was counted as a bad sample"
    keys = s3_keys(cluster, f"runs/{run_name}/")
    checkpoints = {k.split("/")[2] for k in keys if f"/{CHECKPOINT_PREFIX}" in k}
    assert checkpoints == {f"{CHECKPOINT_PREFIX}{s:08d}" for s in (8, 12)}
    assert complete_checkpoints(cluster, run_name) == [8, 12], "a checkpoint without its manifest"


def job_logs(cluster: Cluster, job_id: str) -> str:
    cmd = f"source {cluster.state}/env.sh && {RAY} job logs {job_id}"
    proc = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120)
    return proc.stdout + proc.stderr


def complete_checkpoints(cluster: Cluster, run_name: str) -> list[int]:
    keys = s3_keys(cluster, f"runs/{run_name}/")
    return sorted(int(k.split("/")[2].removeprefix("checkpoint_step")) for k in keys if k.endswith("/manifest.json"))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting the small tmpfs that fills up needs root")
def test_full_checkpoint_disk_fails_naming_the_path_and_resume_continues_from_the_previous_one(
    cluster, baseline, tmp_path
):
    staging = tmp_path / "staging"
    staging.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(staging)], check=True)
    try:
        run_name = f"disk-{secrets.token_hex(3)}"
        args = (f"--set train.checkpoint_staging_dir={staging}", "--set ray.max_failures=0")
        job_id = job_id_of(submit(cluster, run_name, *args, wait=False))
        deadline = time.monotonic() + 300
        while not complete_checkpoints(cluster, run_name) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert complete_checkpoints(cluster, run_name), "no first checkpoint"
        with (staging / "ballast").open("wb") as ballast:  # fill the disk: the next checkpoint share cannot fit
            try:
                while True:
                    ballast.write(b"\0" * (1 << 20))
                    ballast.flush()
            except OSError:
                pass
        assert wait_job(cluster, job_id) == "FAILED"
        logs = job_logs(cluster, job_id)
        assert f"writing this rank's share under {staging}" in logs, logs[-4000:]
        assert "free there" in logs
        intact = complete_checkpoints(cluster, run_name)
        assert intact and intact[-1] < STEPS, intact
        (staging / "ballast").unlink()
        proc = submit(cluster, run_name, "--resume", *args)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        records = consumed(run_name)
        assert all(records[(0, s)][-1]["resumed_from"] == intact[-1] for s in range(intact[-1] + 1, STEPS + 1))
        assert_exactly_once(cluster, run_name, baseline[1])
    finally:
        subprocess.run(["umount", "-l", str(staging)], check=False)


def test_a_node_with_other_package_versions_fails_the_job_naming_node_and_versions(cluster, tmp_path):
    fake = tmp_path / "site"
    (fake / "torch-0.0.1.dist-info").mkdir(parents=True)
    (fake / "torch-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 0.0.1\n")
    env = {
        **cluster.env,
        "RAY_WORKER_NODES": "3",
        "PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    subprocess.run(["cluster/local/start.sh"], cwd=REPO, env=env, check=True, timeout=300)  # node 3 joins
    try:
        proc = submit(cluster, f"ver-{secrets.token_hex(3)}")
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "nodes run other package versions" in out and "'torch': '0.0.1 (driver " in out, out[-4000:]
        assert "RayTrainWorker" not in out
    finally:
        node = cluster.state / "ray_node3.pid"
        stop_process_tree_pid(int(node.read_text()))
        node.unlink()


def stop_process_tree_pid(pid: int) -> None:
    process = psutil.Process(pid)
    tree = [process, *process.children(recursive=True)]
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=20)
    for p in alive:
        p.kill()
