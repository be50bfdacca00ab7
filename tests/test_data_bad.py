"""Bad data: truncated or corrupt shards, missing shards and schema-failing samples are skipped, counted and
replaced without changing any rank's step count; past the threshold the run fails naming the shard; a shard
whose sha256 differs from the manifest fails before training."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
from _data import make_dataset, reference_ids, run_epoch, streams

from gemb_dist.config import DataConfig


@pytest.fixture
def shards(tmp_path):
    return make_dataset(tmp_path, {"alpha": 16, "beta": 8}, samples_per_shard=4)


def _config(shards, **fields) -> DataConfig:
    fields = {"global_batch_size": 4, "verify_sha256": False, **fields}
    return DataConfig(shards=str(shards), shuffle_buffer=8, num_workers=2, **fields)


def _run(config, world_size=2):
    ranks = streams(config, world_size)
    steps = run_epoch(ranks)
    assert all(b is not None for step in steps for b in step)
    return ranks, steps


def test_truncated_shard_is_skipped_counted_and_filled(shards):
    clean_ranks, clean = _run(_config(shards))
    path = shards / "shard-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut mid-archive
    ranks, steps = _run(_config(shards))
    assert len(steps) == len(clean)  # same plan, same number of steps on every rank
    bad = sum(r.stats["bad_samples"] for r in ranks)
    assert 0 < bad < 4
    assert [len(b.sample_ids) for step in steps for b in step] == [len(b.sample_ids) for s in clean for b in s]


def test_missing_shard_and_invalid_sample(shards):
    (shards / "shard-000001.tar").unlink()
    # rewrite one sample of another shard so that it fails the schema (no positive)
    path = shards / "shard-000002.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for i, (member, payload) in enumerate(members):
            if i == 1:
                sample = json.loads(payload)
                del sample["positive"]
                payload = json.dumps(sample).encode()
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    path.write_bytes(out.getvalue())
    ranks, steps = _run(_config(shards))
    assert sum(r.stats["bad_samples"] for r in ranks) == 4 + 1
    ids = [i for step in steps for b in step for i in b.sample_ids]
    assert len(ids) == 24 and set(ids) <= set(reference_ids(shards))


def test_threshold_fails_naming_the_shard(shards):
    (shards / "shard-000003.tar").unlink()
    with pytest.raises(ValueError, match=r"shard-000003\.tar.*max_bad_samples=2"):
        _run(_config(shards, max_bad_samples=2))


def test_sha256_mismatch_fails_before_training(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    path = copy / "shard-000002.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # flip one byte of a sample's text
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-000002\.tar: sha256 .* does not match"):
        streams(_config(copy, verify_sha256=True), 1)
    streams(_config(shards, verify_sha256=True), 1)  # the intact copy passes
