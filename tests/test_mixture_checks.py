"""A fine-tuning mixture that cannot train as configured is refused on the driver, naming the field."""

from __future__ import annotations

import json

import pytest

from gemb_dist.config import ConfigError, build_config
from gemb_dist.data.build import build_shards
from gemb_dist.data.manifest import load_manifest
from gemb_dist.data.mixture import check_mixture
from gemb_dist.data.storage import Storage
from gemb_dist.train.ray_trainer import prepare_run


@pytest.fixture
def shards(tmp_path):
    rows = [{"task": "big", "query": f"q{i}", "positive": f"p{i}"} for i in range(40)]
    rows += [{"task": "small", "query": f"s{i}", "positive": f"t{i}"} for i in range(6)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_shards([str(tmp_path / "pairs.jsonl")], str(tmp_path / "shards"), samples_per_shard=16)
    return str(tmp_path / "shards")


def data(shards, **fields):
    return build_config({"data": {"shards": shards, "mode": "finetune", **fields}}).data


@pytest.mark.parametrize("weights", [{"big": 0.0, "small": 0.0}, {"big": -1.0, "small": 2.0}])
def test_weights_must_be_non_negative_with_a_positive_sum(weights):
    with pytest.raises(ConfigError, match=r"data.task_weights must be non-negative with a positive sum"):
        build_config({"data": {"task_weights": weights}})


def test_a_task_without_shards_is_named(shards):
    config = data(shards, global_batch_size=4, task_weights={"big": 1.0, "smal": 1.0})
    with pytest.raises(ValueError, match=r"data.task_weights\['smal'\]: no shards of task 'smal'"):
        check_mixture(config, load_manifest(Storage(shards)), shards)


def test_a_task_smaller_than_one_global_batch_is_refused_unless_weighted_zero(shards):
    manifest = load_manifest(Storage(shards))
    with pytest.raises(ValueError, match=r"data.task_weights\['small'\]: task 'small' has 6 samples.*=8"):
        check_mixture(data(shards, global_batch_size=8), manifest, shards)
    check_mixture(data(shards, global_batch_size=8, task_weights={"big": 1.0, "small": 0.0}), manifest, shards)
    check_mixture(data(shards, global_batch_size=6), manifest, shards)


def test_prefinetune_needs_one_global_batch(shards):
    manifest = load_manifest(Storage(shards))
    config = build_config({"data": {"shards": shards, "global_batch_size": 64}}).data
    with pytest.raises(ValueError, match=r"data.global_batch_size \(64\) is larger than the dataset \(46 samples"):
        check_mixture(config, manifest, shards)


def test_prepare_run_refuses_before_any_worker_starts(shards, tmp_path):
    config = build_config(
        {
            "ray": {"storage_path": str(tmp_path / "runs")},
            "train": {"run_name": "r", "stage": "finetune"},
            "data": {"shards": shards, "mode": "finetune", "global_batch_size": 8},
        }
    )
    with pytest.raises(ValueError, match=r"data.task_weights\['small'\]"):
        prepare_run(config)
