"""Cluster jobs without a cluster: every RayJob entrypoint names a job and a config that loads with its typed
config and keeps its files on shared storage; the data-build job runs through `ray job submit` against local S3.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import _kustomize  # noqa: E402
from _services import BIN_DIR, free_port, ray_head, stop_process_tree, wait_for_http  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RAYJOBS = ROOT / "cluster" / "kuberay" / "rayjobs.yaml"
SHARED_MOUNT = "/mnt/gemb"  # where raycluster.yaml mounts the shared volume on every Ray pod
JOBS = {"build-data", "prefinetune", "finetune", "soup", "evaluate"}


# ------------------------------------------------------------------------------------------------ jobs and configs
def _load_job_config(job: str, config_path: Path):
    from gemb_dist.config import load_config
    from gemb_dist.config_cli import schema

    return load_config(config_path, cls=schema({"prefinetune": "train", "finetune": "train"}.get(job, job)))


def _entrypoints() -> dict[str, list[str]]:
    objects = _kustomize.load_documents(RAYJOBS)
    return {
        o["metadata"]["labels"]["app.kubernetes.io/component"]: shlex.split(o["spec"]["entrypoint"]) for o in objects
    }


@pytest.mark.parametrize("job", sorted(JOBS))
def test_entrypoint_names_an_existing_job_and_a_config_that_loads(job):
    argv = _entrypoints()[job]
    script = f"jobs/{job.replace('-', '_')}.py"
    assert argv[:2] == ["python", script] and argv[2] == "--config" and len(argv) == 4, argv
    assert (ROOT / script).is_file(), f"{script} (named by the {job} RayJob) does not exist"
    config_path = ROOT / argv[3]
    assert config_path.is_file(), f"{argv[3]} (named by the {job} RayJob) does not exist"
    config = _load_job_config(job.replace("-", "_"), config_path)
    if job in ("prefinetune", "finetune"):
        assert config_path.name.endswith("_gpu.yaml"), "cluster jobs train on the GPU configs"
        assert config.ray.use_gpu, f"{argv[3]}: the RayJob runs on GPU workers but ray.use_gpu is false"
        assert config.train.stage == job, f"{argv[3]}: train.stage is {config.train.stage}"
    # Drivers and workers run on different pods: a pod-local or relative path would split the run.
    for field, path in _storage_paths(job, config).items():
        assert re.match(r"(s3|gs)://", path) or path.startswith(SHARED_MOUNT + "/"), (
            f"{argv[3]}: {field}={path!r} is not on shared storage ({SHARED_MOUNT}/... or s3://)"
        )


def _storage_paths(job: str, config) -> dict[str, str]:
    """The file locations a job reads or writes, by config field."""
    if job in ("prefinetune", "finetune"):
        paths = {"data.shards": config.data.shards, "ray.storage_path": config.ray.storage_path}
        return paths | ({"train.init_from": config.train.init_from} if config.train.init_from else {})
    if job == "soup":
        paths = {f"ingredients[{i}]": x.path or x.zero_checkpoint for i, x in enumerate(config.ingredients)}
        paths = {field: path for field, path in paths.items() if path}  # MLflow-run ingredients have no path
        held_out = (
            config.held_out.model_dump(include={"sts", "retrieval", "clustering", "pairs"}) if config.held_out else {}
        )
        return paths | {"output_dir": config.output_dir} | {f"held_out.{k}": v for k, v in held_out.items() if v}
    if job == "evaluate":
        fields = config.model_dump(include={"model", "sts", "retrieval", "clustering", "pairs", "out"})
        return {field: path for field, path in fields.items() if path}
    return {f"input[{i}]": path for i, path in enumerate(config.input)} | {"output": config.output}


def test_the_data_build_writes_what_pre_finetuning_reads():
    from gemb_dist.config import load_config

    build = _load_job_config("build_data", ROOT / _entrypoints()["build-data"][3])
    prefinetune = load_config(ROOT / _entrypoints()["prefinetune"][3])
    assert build.output.rstrip("/") == prefinetune.data.shards.rstrip("/")


# ------------------------------------------------------------------------------------------------ build-data job
@pytest.fixture
def s3_and_ray(tmp_path, monkeypatch):
    """A moto S3 server and a Ray head whose workers see it through the environment, as pods do on the cluster."""
    port = free_port()
    with open(tmp_path / "moto.log", "w") as log:
        moto = subprocess.Popen(
            [str(BIN_DIR / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
        )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for_http(f"{endpoint}/moto-api/", moto, tmp_path / "moto.log", timeout_s=60)
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
            monkeypatch.setenv(name, value)
        # Explicit, so a token left in ~/.ray by any local ray.init() cannot switch this head to token auth.
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        with ray_head(tmp_path / "ray", num_cpus=2) as head:
            yield head
    finally:
        stop_process_tree(moto)


@pytest.mark.slow
def test_build_data_job_writes_shards_to_s3_from_a_ray_task(tmp_path, s3_and_ray):
    """`ray job submit` of the job, as on the cluster: the driver on the head, the build in a worker task."""
    import boto3

    from gemb_dist.data.manifest import load_manifest
    from gemb_dist.data.storage import Storage

    raw = tmp_path / "pairs.jsonl"
    samples = [{"task": "qa" if i % 2 else "nli", "query": f"q{i}", "positive": f"p{i}"} for i in range(10)]
    raw.write_text("".join(json.dumps(s) + "\n" for s in samples))
    config = tmp_path / "build.yaml"
    settings = {"input": [str(raw)], "output": "s3://gemb-data/shards/v1", "samples_per_shard": 3}
    config.write_text(yaml.safe_dump(settings))
    boto3.client("s3").create_bucket(Bucket="gemb-data")

    def submit(*overrides: str) -> tuple[int, str]:
        command = [str(BIN_DIR / "ray"), "job", "submit", "--address", s3_and_ray.dashboard_url, "--"]
        command += ["python", str(ROOT / "jobs" / "build_data.py"), "--config", str(config)]
        command += [f"--set={override}" for override in overrides]  # the CLI quotes them for the shell
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        return result.returncode, result.stdout + result.stderr

    code, output = submit()
    assert code == 0, output[-3000:]
    summary = json.loads(next(line for line in output.splitlines() if line.startswith('{"output"')))
    assert summary["num_samples"] == 10 and summary["tasks"] == {"nli": 5, "qa": 5}
    # The trainer's own manifest loader reads what the job uploaded, and nothing else was left there.
    uploaded = load_manifest(Storage("s3://gemb-data/shards/v1"))
    assert uploaded.num_samples == 10 and len(uploaded.shards) == summary["num_shards"] == 4
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="gemb-data")["Contents"]}
    assert keys == {f"shards/v1/{s.path}" for s in uploaded.shards} | {"shards/v1/manifest.json"}

    # An existing dataset is never overwritten, and errors raised in the task reach the log as one line.
    code, output = submit()
    assert code != 0 and "s3://gemb-data/shards/v1/manifest.json exists" in output and "exit code 2" in output
    missing = tmp_path / "missing.jsonl"
    code, output = submit(f"input=[{missing}]", "output=s3://gemb-data/shards/v2")
    assert code != 0 and f"build_data: error: {missing}: input file not found" in output, output[-3000:]


def test_build_data_job_rejects_a_bad_config_naming_the_field(tmp_path):
    config = tmp_path / "build.yaml"
    config.write_text(yaml.safe_dump({"input": ["a.jsonl"], "output": "out", "samples_per_shard": 0}))
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "build_data.py"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "samples_per_shard" in result.stderr and str(config) in result.stderr
