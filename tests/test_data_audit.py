"""`gemb data audit`: the JSON figures of the trainer's exact data path, for fresh and resumed runs."""

from __future__ import annotations

import json

import pytest
from _data import make_dataset

from gemb_dist.cli import main


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("audit"), {"a": 17, "b": 10, "c": 6}, samples_per_shard=4)


def sets(**fields) -> list[str]:
    """`--set` arguments of the audit's fields; `data__seed` names data.seed."""
    return [arg for key, value in fields.items() for arg in ("--set", f"{key.replace('__', '.')}={value}")]


def _audit(capsys, shards, *args) -> dict:
    assert main(["data", "audit", str(shards), *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (2, 1), (3, 2), (4, 2)])
def test_audit_prefinetune_exact(capsys, shards, world_size, num_workers):
    G = 2 * world_size
    args = sets(world_size=world_size, data__num_workers=num_workers, data__global_batch_size=G, epochs=2)
    result = _audit(capsys, shards, *args, *sets(in_process="true", data__shuffle_buffer=5))
    assert result["samples_total"] == 33
    assert result["duplicates"] == 0 and result["missing"] == 0 and result["bad_samples"] == 0
    assert result["remainder"] == (33 * 2) % G  # two epochs of 33 samples, carried remainders included
    assert result["samples_yielded"] == 66 - result["remainder"]
    assert result["steps_per_rank"] == [(66 - result["remainder"]) // G] * world_size


@pytest.mark.slow
def test_audit_finetune_and_resume_with_real_workers(capsys, shards):
    args = sets(world_size=2, data__num_workers=2, data__global_batch_size=4, data__mode="finetune", data__seed=3)
    result = _audit(capsys, shards, *args, *sets(resume_after_steps=3))
    assert result["mixed_task_steps"] == 0
    assert result["remainder"] == 17 % 4 + 10 % 4 + 6 % 4 and result["duplicates"] == result["missing"] == 0
    resume = result["resume"]
    assert resume["after_steps"] == 3 and resume["states_identical_across_ranks"]
    assert resume["same_batches_as_uninterrupted"]
    assert resume["duplicates"] == resume["missing"] == 0 and resume["mixed_task_steps"] == 0
    assert resume["steps_per_rank"] == [result["steps_per_rank"][0] - 3] * 2

    changed = _audit(capsys, shards, *args, *sets(resume_after_steps=3, resume_world_size=4, in_process="true"))
    assert changed["resume"]["duplicates"] == changed["resume"]["missing"] == 0
    assert len(changed["resume"]["steps_per_rank"]) == 4 and len(set(changed["resume"]["steps_per_rank"])) == 1


def test_audit_rejects_bad_layout(capsys, shards):
    assert main(["data", "audit", str(shards), *sets(world_size=3, data__global_batch_size=4)]) == 2
    assert "must be divisible by the world size (3)" in capsys.readouterr().err
