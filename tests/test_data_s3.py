"""Shards on S3-compatible storage: a real moto server on 127.0.0.1, endpoint and credentials from the environment
only. The stream read from s3:// must equal the one read from the local copy, in-process and with real workers."""

from __future__ import annotations

import boto3
import pytest
from _data import make_dataset, run_epoch, streams
from _services import moto_server

from gemb_dist.config import DataConfig


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_endpoint


@pytest.mark.slow
def test_stream_from_s3_equals_local(s3_env, tmp_path):
    shards = make_dataset(tmp_path, {"qa": 13, "nli": 9}, samples_per_shard=4)
    client = boto3.client("s3")
    client.create_bucket(Bucket="train-data")
    for path in shards.iterdir():
        client.upload_file(str(path), "train-data", f"sets/v1/{path.name}")

    def ids(location, in_process=True, **fields):
        config = DataConfig(shards=location, mode="finetune", global_batch_size=4, num_workers=2, **fields)
        return [[b.sample_ids for b in step] for step in run_epoch(streams(config, 2, in_process))]

    local = ids(str(shards))
    assert len(local) == 13 // 4 + 9 // 4
    assert ids("s3://train-data/sets/v1") == local
    assert ids("s3://train-data/sets/v1/manifest.json", in_process=False, verify_sha256=True) == local
    assert ids(f"file://{shards}") == local

    client.delete_object(Bucket="train-data", Key="sets/v1/shard-000001.tar")
    config = DataConfig(shards="s3://train-data/sets/v1", global_batch_size=4, num_workers=0, max_bad_samples=1)
    with pytest.raises(ValueError, match=r"s3://train-data/sets/v1/shard-000001\.tar: shard missing"):
        run_epoch(streams(config, 1))
    with pytest.raises(ValueError, match="manifest not found"):
        streams(DataConfig(shards="s3://train-data/other", global_batch_size=4), 1)
