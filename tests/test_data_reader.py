"""The training stream: exactly once per epoch, equal steps on every rank, task-homogeneous fine-tuning batches,
exact mid-epoch resume (same or changed layout), all checked against a plain-webdataset reference read."""

from __future__ import annotations

from collections import Counter

import pytest
from _data import make_dataset, reference_ids, run_epoch, streams

from gemb_dist.config import DataConfig

# uneven: task shards of 5 leave a short last shard per task (3, 1 and 2 samples)
COUNTS = {"alpha": 23, "beta": 11, "gamma": 7}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("reader"), COUNTS, samples_per_shard=5)


def _config(shards, **fields) -> DataConfig:
    return DataConfig(shards=str(shards), shuffle_buffer=6, **fields)


def _check_epoch(steps, world_size: int, local_batch: int) -> list[str]:
    """Every rank got a full batch at every step; returns the yielded ids in order."""
    ids = []
    for batches in steps:
        assert all(b is not None for b in batches), "a rank ran out of batches before the others"
        assert [len(b.sample_ids) for b in batches] == [local_batch] * world_size
        ids += [i for b in batches for i in b.sample_ids]
    return ids


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_exactly_once_and_equal_steps(shards, world_size, num_workers):
    G = 4 * world_size
    truth = reference_ids(shards)
    ranks = streams(_config(shards, global_batch_size=G, num_workers=num_workers, seed=world_size), world_size)
    expected_steps = len(truth) // G
    assert ranks[0].steps_per_epoch == expected_steps

    first = Counter(_check_epoch(run_epoch(ranks), world_size, 4))
    assert len(first) == expected_steps * G and max(first.values()) == 1  # no duplicates
    assert set(first) <= set(truth)
    left_over = set(truth) - set(first)
    assert len(left_over) == len(truth) % G  # the remainder, smaller than a global batch
    assert ranks[0].stats["remainder"] == len(left_over)

    # epoch 2 yields the carried remainder plus everything again; across both epochs, every sample twice except
    # the ones pending after epoch 2
    second = Counter(_check_epoch(run_epoch(ranks), world_size, 4))
    assert left_over <= set(second)
    pending = 2 * len(truth) - sum(first.values()) - sum(second.values())
    assert 0 <= pending < G
    total = first + second
    assert sum(1 for i in truth if total[i] == 2) == len(truth) - pending
    assert all(total[i] in (1, 2) for i in truth)


def test_more_ranks_than_shards(tmp_path):
    shards = make_dataset(tmp_path, {"only": 12}, samples_per_shard=6)  # 2 shards, 4 ranks
    truth = reference_ids(shards)
    ranks = streams(DataConfig(shards=str(shards), global_batch_size=8, num_workers=2, shuffle_buffer=4), 4)
    ids = _check_epoch(run_epoch(ranks), 4, 2)
    assert len(ids) == 8 and len(set(ids)) == 8 and set(ids) <= set(truth)


def test_finetune_batches_are_task_homogeneous(shards):
    truth = reference_ids(shards)
    G = 4
    ranks = streams(_config(shards, mode="finetune", global_batch_size=G, num_workers=2), 2)
    steps = run_epoch(ranks)
    tasks_per_step = [{t for b in batches for t in b.tasks} for batches in steps]
    assert all(len(tasks) == 1 for tasks in tasks_per_step)
    # every task's full global batches are taken, each sample once; per-task remainders stay behind
    ids = Counter(_check_epoch(steps, 2, 2))
    assert max(ids.values()) == 1
    for task, count in COUNTS.items():
        assert sum(1 for i in ids if truth[i] == task) == count // G * G
    assert len({frozenset(t) for t in tasks_per_step}) == len(COUNTS)  # the schedule interleaves all tasks
    assert [next(iter(t)) for t in tasks_per_step] != sorted(next(iter(t)) for t in tasks_per_step)


def test_finetune_task_weights_front_load_heavy_task(shards):
    weights = {"alpha": 0.0001, "beta": 1000.0, "gamma": 1.0}
    ranks = streams(_config(shards, mode="finetune", global_batch_size=2, task_weights=weights), 1)
    order = [b[0].tasks[0] for b in run_epoch(ranks)]
    assert order[: COUNTS["beta"] // 2] == ["beta"] * (COUNTS["beta"] // 2)
    assert Counter(order) == {t: n // 2 for t, n in COUNTS.items()}  # weights reorder, never drop or repeat


@pytest.mark.parametrize("mode", ["prefinetune", "finetune"])
def test_resume_mid_epoch_is_exact(shards, mode):
    config = _config(shards, mode=mode, global_batch_size=6, num_workers=2)
    uninterrupted = [[b.sample_ids for b in step] for step in run_epoch(streams(config, 3))]

    ranks = streams(config, 3)
    before = [[b.sample_ids for b in step] for step in run_epoch(ranks, max_steps=3)]
    states = [r.state_dict() for r in ranks]
    assert all(s == states[0] for s in states) and states[0]["step"] == 3
    resumed = streams(config, 3)
    for stream, state in zip(resumed, states, strict=True):
        stream.load_state_dict(state)
    after = [[b.sample_ids for b in step] for step in run_epoch(resumed)]
    assert before + after == uninterrupted


@pytest.mark.parametrize("new_world, new_workers", [(2, 1), (4, 0), (1, 2)])
def test_resume_with_changed_layout_repartitions(shards, new_world, new_workers):
    truth = reference_ids(shards)
    config = _config(shards, global_batch_size=12, num_workers=2)
    ranks = streams(config, 3)
    before = [i for step in run_epoch(ranks, max_steps=1) for b in step for i in b.sample_ids]
    state = ranks[0].state_dict()
    resumed = streams(config.model_copy(update={"num_workers": new_workers}), new_world)
    for stream in resumed:
        stream.load_state_dict(state)
    after = _check_epoch(run_epoch(resumed), new_world, 12 // new_world)
    seen = Counter(before + after)
    assert max(seen.values()) == 1 and set(seen) <= set(truth)
    assert len(truth) - len(seen) < 12  # only the remainder is left for the next epoch
    assert resumed[0].stats["remainder"] == len(truth) - len(seen)


def test_resume_refuses_other_data(shards, tmp_path):
    state = streams(_config(shards, global_batch_size=4), 1)[0].state_dict()
    other = make_dataset(tmp_path, {"alpha": 9}, samples_per_shard=5)
    with pytest.raises(ValueError, match="fingerprint"):
        streams(_config(other, global_batch_size=4), 1)[0].load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        streams(_config(shards, global_batch_size=4, seed=7), 1)[0].load_state_dict(state)


def test_deterministic_and_seed_dependent(shards):
    def order(seed):
        return [b[0].sample_ids for b in run_epoch(streams(_config(shards, global_batch_size=4, seed=seed), 1))]

    assert order(1) == order(1)
    assert order(1) != order(2)


@pytest.mark.slow
def test_real_dataloader_workers_match_in_process(shards):
    config = _config(shards, mode="finetune", global_batch_size=4, num_workers=2)
    in_process = [[b.sample_ids for b in s] for s in run_epoch(streams(config, 2))]
    ranks = streams(config, 2, in_process=False)
    with_workers = [[b.sample_ids for b in s] for s in run_epoch(ranks, max_steps=5)]
    state = ranks[0].state_dict()
    resumed = streams(config, 2, in_process=False)
    for stream in resumed:
        stream.load_state_dict(state)
    with_workers += [[b.sample_ids for b in s] for s in run_epoch(resumed)]
    assert with_workers == in_process


def test_two_successive_layout_changes(shards):
    truth = reference_ids(shards)
    config = _config(shards, mode="finetune", global_batch_size=4, num_workers=1)
    seen: Counter[str] = Counter()
    state = None
    for world_size, num_workers, max_steps in [(2, 1, 2), (1, 2, 3), (4, 0, None)]:
        ranks = streams(config.model_copy(update={"num_workers": num_workers}), world_size)
        for stream in ranks:
            if state is not None:
                stream.load_state_dict(state)
        steps = run_epoch(ranks, max_steps=max_steps)
        assert all(len({t for b in batches for t in b.tasks}) == 1 for batches in steps)
        seen.update(_check_epoch(steps, world_size, 4 // world_size))
        state = ranks[0].state_dict()
    assert max(seen.values()) == 1 and set(seen) <= set(truth)
    assert len(truth) - len(seen) == sum(n % 4 for n in COUNTS.values())  # per-task remainders only


def test_reader_yields_what_the_plan_says(shards):
    """Each rank's batch at each step holds exactly the (shard, index) items the plan assigns it."""
    import webdataset as wds

    urls = sorted(str(p) for p in shards.glob("shard-*.tar"))
    by_item = {}
    for shard, url in enumerate(urls):
        for index, sample in enumerate(wds.WebDataset(url, shardshuffle=False).decode()):
            by_item[shard, index] = sample["json"]["id"]
    ranks = streams(_config(shards, mode="finetune", global_batch_size=6, num_workers=2), 3)
    plan = ranks[0].planner.plan()
    for step, batches in enumerate(run_epoch(ranks)):
        for rank, batch in enumerate(batches):
            group, items = plan.local_batch_items(step, rank)
            assert batch.sample_ids == [by_item[tuple(item)] for item in items.tolist()]
            assert set(batch.tasks) == {group}
