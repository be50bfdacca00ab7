"""S3 that throttles (503 SlowDown) or drops connections, through a real fault proxy in front of a real moto server:
shard reads and checkpoint-style writes are retried with backoff and come out exactly as without faults; a bad
S3 location (no credentials, missing bucket) fails on the driver naming the field and the URL."""

from __future__ import annotations

import boto3
import pytest
from _data import make_dataset, run_epoch, streams
from _fault_proxy import FaultProxy
from _services import moto_server

from gemb_dist.config import DataConfig, build_config
from gemb_dist.data.storage import check_s3_location, pyarrow_filesystem
from gemb_dist.train.ray_trainer import prepare_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def proxy(moto):
    with FaultProxy(moto) as proxy:
        yield proxy


@pytest.fixture
def s3_env(proxy, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return proxy


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, proxy):
    shards = make_dataset(tmp_path_factory.mktemp("data"), {"qa": 13, "nli": 9}, samples_per_shard=4)
    client = boto3.client(
        "s3", endpoint_url=proxy.endpoint, aws_access_key_id="t", aws_secret_access_key="t", region_name="us-east-1"
    )
    client.create_bucket(Bucket="faulty")
    for path in shards.iterdir():
        client.upload_file(str(path), "faulty", f"v1/{path.name}")
    return shards


def epoch_ids(location: str) -> tuple[list, int]:
    config = DataConfig(shards=location, mode="finetune", global_batch_size=4, num_workers=2, verify_sha256=True)
    ranks = streams(config, 2)
    steps = run_epoch(ranks)
    return [[b.sample_ids for b in step] for step in steps], sum(r.stats["bad_samples"] for r in ranks)


@pytest.mark.parametrize("fault", ["slowdown", "reset"])
def test_shard_reads_are_retried_through_throttling_and_dropped_connections(s3_env, dataset, fault):
    local, _ = epoch_ids(str(dataset))
    before = s3_env.counts[fault]
    s3_env.fault(fault, seconds=2.5)  # manifest, sha256 checks and shard reads all start inside the window
    faulty, num_bad = epoch_ids("s3://faulty/v1")
    assert s3_env.counts[fault] - before >= 1, f"the proxy injected no fault: {s3_env.counts}"
    assert faulty == local and num_bad == 0, "a fault was counted as a bad sample instead of retried"


@pytest.mark.parametrize("fault", ["slowdown", "reset"])
def test_writes_through_the_ray_train_filesystem_are_retried(s3_env, dataset, tmp_path, fault):
    import pyarrow.fs

    source = tmp_path / "checkpoint"
    (source / "deepspeed").mkdir(parents=True)
    for i in range(3):
        (source / "deepspeed" / f"part{i}.pt").write_bytes(bytes([i]) * 100_000)
    filesystem, root = pyarrow_filesystem(f"s3://faulty/runs-{fault}/checkpoint_000001")
    before = s3_env.counts[fault]
    s3_env.fault(fault, seconds=2.0)
    pyarrow.fs.copy_files(str(source), root, destination_filesystem=filesystem)
    assert s3_env.counts[fault] - before >= 1
    written = {
        info.path.removeprefix(root + "/"): info.size
        for info in filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
        if info.type == pyarrow.fs.FileType.File
    }
    assert written == {f"deepspeed/part{i}.pt": 100_000 for i in range(3)}
    with filesystem.open_input_stream(f"{root}/deepspeed/part2.pt") as f:
        assert f.read() == bytes([2]) * 100_000


def job_config(shards: str, storage: str):
    data = {"shards": shards, "global_batch_size": 8}  # the 22-sample dataset must fill one global batch
    return build_config({"data": data, "ray": {"storage_path": storage}, "train": {"run_name": "r"}})


def test_missing_bucket_fails_on_the_driver_naming_the_field_and_url(s3_env, dataset, tmp_path):
    with pytest.raises(ValueError, match=r"data\.shards=s3://no-such-bucket/v1: bucket 'no-such-bucket' does not"):
        prepare_run(job_config("s3://no-such-bucket/v1", str(tmp_path / "runs")))
    with pytest.raises(ValueError, match=r"ray\.storage_path=s3://gone/runs: bucket 'gone' does not exist"):
        prepare_run(job_config("s3://faulty/v1", "s3://gone/runs"))
    run = prepare_run(job_config("s3://faulty/v1", "s3://faulty/runs"))  # both usable: no error
    assert run.storage == "s3://faulty/runs"


def test_s3_without_credentials_fails_naming_the_url(s3_env, dataset, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(ValueError, match=r"data\.shards=s3://faulty/v1: no S3 credentials found"):
        prepare_run(job_config("s3://faulty/v1", str(tmp_path / "runs")))
    with pytest.raises(ValueError, match=r"ray\.storage_path=s3://faulty/runs: no S3 credentials found"):
        check_s3_location("s3://faulty/runs", "ray.storage_path")
