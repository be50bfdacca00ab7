"""`gemb data audit`: run the trainer's exact data path for every rank without a model and account for samples.

Every rank's `TrainStream` is built by `build_train_stream` (no tokenizer) and stepped in lockstep, the way
ranks meet at each collective; the audit then counts what was yielded against what the plan promises: each
sample once per epoch, except the pending remainder carried past the last epoch.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import Field

from gemb_dist.config import DataConfig, Section
from gemb_dist.data.reader import TrainStream, build_train_stream
from gemb_dist.data.shards import BadSample, ShardReader


class AuditConfig(Section):
    """What `gemb data audit` simulates: a training run's `data` section on `world_size` ranks, optionally stopped
    after some steps and resumed with another layout."""

    data: DataConfig = Field(default_factory=DataConfig, description="The data section of the training config.")
    world_size: int = Field(..., gt=0, description="Ranks to simulate (ray.num_workers of the training config).")
    epochs: int = Field(1, gt=0, description="Epochs to run through.")
    resume_after_steps: int | None = Field(
        None, gt=0, description="Also audit a run stopped after this many steps and resumed; None = no resume."
    )
    resume_world_size: int | None = Field(None, gt=0, description="Ranks of the resumed run; None = world_size.")
    resume_num_workers: int | None = Field(
        None, ge=0, description="Loader workers per rank of the resumed run; None = data.num_workers."
    )
    in_process: bool = Field(False, description="Run the loader workers' code in this process (same plan, no forks).")


class _Run:
    """What a sequence of lockstep global steps yielded."""

    def __init__(self, world_size: int):
        self.ids: Counter[str] = Counter()
        self.steps_per_rank = [0] * world_size
        self.mixed_task_steps = 0
        self.substituted = 0
        self.rows = 0
        self.sequence: list[list[str]] = []  # per global step, all ranks' ids in rank order

    def record(self, batches: list) -> None:
        tasks: set[str] = set()
        step_ids: list[str] = []
        for rank, batch in enumerate(batches):
            if batch is None:
                continue
            self.steps_per_rank[rank] += 1
            tasks.update(batch.tasks)
            step_ids += batch.sample_ids
            self.substituted += batch.stats.get("bad_samples", 0)
        self.rows += len(step_ids)
        self.ids.update(step_ids)
        self.mixed_task_steps += len(tasks) > 1
        self.sequence.append(step_ids)


def _streams(data: DataConfig, world_size: int, in_process: bool) -> list[TrainStream]:
    streams = [build_train_stream(data, None, None, rank=r, world_size=world_size) for r in range(world_size)]
    for stream in streams:
        stream.in_process = in_process
    return streams


def _drive(streams: list[TrainStream], run: _Run, until_epoch: int, max_steps: int | None = None) -> None:
    """Step all ranks together until `until_epoch` starts (or `max_steps` global steps are done)."""
    while streams[0].epoch < until_epoch:
        iterators = [iter(s) for s in streams]
        while True:
            if max_steps is not None and len(run.sequence) >= max_steps:
                for it in iterators:
                    it.close()
                return
            batches = [next(it, None) for it in iterators]
            if all(b is None for b in batches):
                break
            run.record(batches)


def _pending_ids(stream: TrainStream) -> Counter[str]:
    """Ids of the samples carried past the last epoch (they are due at the start of the next one)."""
    reader = ShardReader(stream.dataset.manifest, stream.dataset.storage)
    pending: Counter[str] = Counter()
    by_shard: dict[int, list[int]] = {}
    for items in stream.planner.carry.values():
        for shard, index in items:
            by_shard.setdefault(shard, []).append(index)
    for shard, indices in sorted(by_shard.items()):
        fetched = reader.fetch(shard, sorted(set(indices)))
        for index in indices:
            sample = fetched[index]
            pending[f"<unreadable {shard}:{index}>" if isinstance(sample, BadSample) else sample["id"]] += 1
    reader.close()
    return pending


def _all_ids(stream: TrainStream) -> dict[str, str]:
    """id -> task of every readable sample in the dataset, read with the same reader code."""
    manifest = stream.dataset.manifest
    reader = ShardReader(manifest, stream.dataset.storage)
    ids = {}
    for shard, info in enumerate(manifest.shards):
        for sample in reader.fetch(shard, list(range(info.num_samples))).values():
            if not isinstance(sample, BadSample):
                ids[sample["id"]] = sample["task"]
    reader.close()
    return ids


def _figures(run: _Run, stream: TrainStream, epochs: int, weights: dict[str, float] | None) -> dict[str, Any]:
    pending = _pending_ids(stream)
    excluded_tasks = {t for t, w in (weights or {}).items() if w <= 0}
    expected = {i: 0 if task in excluded_tasks else epochs - pending[i] for i, task in _all_ids(stream).items()}
    extra = sum(max(0, run.ids[i] - expected.get(i, 0)) for i in set(run.ids) | set(expected))
    return {
        "samples_yielded": run.rows - run.substituted,
        "unique_samples_yielded": len(run.ids),
        "duplicates": extra - run.substituted,
        "missing": sum(max(0, n - run.ids[i]) for i, n in expected.items()),
        "remainder": sum(pending.values()),
        "bad_samples": run.substituted,
        "steps_per_rank": run.steps_per_rank,
        "mixed_task_steps": run.mixed_task_steps,
    }


def run_audit(config: AuditConfig) -> dict[str, Any]:
    """The audit's JSON object (see the module docstring)."""
    data, world_size, epochs, in_process = config.data, config.world_size, config.epochs, config.in_process
    resume_after_steps, resume_world_size = config.resume_after_steps, config.resume_world_size
    resume_num_workers = config.resume_num_workers
    streams = _streams(data, world_size, in_process)
    manifest = streams[0].dataset.manifest
    weights = data.task_weights if data.mode == "finetune" else None
    run = _Run(world_size)
    _drive(streams, run, epochs)
    result: dict[str, Any] = {
        "samples_total": manifest.num_samples,
        "tasks": manifest.tasks,
        "world_size": world_size,
        "num_workers": data.num_workers,
        "global_batch_size": data.global_batch_size,
        "mode": data.mode,
        "epochs": epochs,
        **_figures(run, streams[0], epochs, weights),
    }
    if resume_after_steps is None:
        return result
    first = _Run(world_size)
    streams = _streams(data, world_size, in_process)
    _drive(streams, first, epochs, max_steps=resume_after_steps)
    states = [s.state_dict() for s in streams]
    new_world = resume_world_size or world_size
    new_data = data.model_copy(
        update={"num_workers": data.num_workers if resume_num_workers is None else resume_num_workers}
    )
    resumed_streams = _streams(new_data, new_world, in_process)
    for stream in resumed_streams:
        stream.load_state_dict(states[0])
    second = _Run(new_world)
    _drive(resumed_streams, second, epochs)
    combined = _Run(max(world_size, new_world))
    combined.ids = first.ids + second.ids
    combined.substituted = first.substituted + second.substituted
    combined.rows = first.rows + second.rows
    combined.mixed_task_steps = first.mixed_task_steps + second.mixed_task_steps
    result["resume"] = {
        "after_steps": len(first.sequence),
        "world_size": new_world,
        "num_workers": new_data.num_workers,
        "states_identical_across_ranks": all(s == states[0] for s in states),
        **_figures(combined, resumed_streams[0], epochs, weights),
        "steps_per_rank_before": first.steps_per_rank,
        "steps_per_rank": second.steps_per_rank,
        "same_batches_as_uninterrupted": first.sequence + second.sequence == run.sequence,
    }
    return result
