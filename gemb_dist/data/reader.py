"""The training stream: a torch IterableDataset that follows the epoch plan, and `TrainStream` around its loader.

Loader worker k of a rank produces the rank's local batches of steps `s0 + k, s0 + k + W, ...` (s0 = the step to
start from, W = num_workers), so the DataLoader's in-order round robin over workers yields exactly the plan's
order, from the start of an epoch or from a resumed position. A sample that cannot be read
is counted and replaced by another sample of the same batch (or the worker's previous sample of that task), so
every rank still yields full batches at every step; the loss masks the duplicate row as it masks any
repeated text. Past `data.max_bad_samples` bad samples in one worker the run fails naming the shard.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gemb_dist.batch import TrainBatch
from gemb_dist.config import DataConfig, ModelConfig
from gemb_dist.data.collate import Collator
from gemb_dist.data.manifest import Manifest, load_manifest, verify_shards
from gemb_dist.data.plan import EpochPlan, Layout
from gemb_dist.data.position import Position
from gemb_dist.data.shards import BadSample, ShardReader, iter_positions
from gemb_dist.data.storage import Storage

log = logging.getLogger(__name__)


class PlanDataset(IterableDataset):
    """One rank's local batches of the configured plan, from `start_step` on, already collated."""

    def __init__(self, manifest: Manifest, storage: Storage, collator: Collator, rank: int, max_bad_samples: int):
        super().__init__()
        self.manifest = manifest
        self.storage = storage
        self.collator = collator
        self.rank = rank
        self.max_bad_samples = max_bad_samples
        self.plan: EpochPlan | None = None
        self.start_step = 0

    def configure(self, plan: EpochPlan, start_step: int) -> None:
        self.plan, self.start_step = plan, start_step

    def __iter__(self) -> Iterator[TrainBatch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.plan.layout.streams_per_rank:
            raise RuntimeError(f"plan made for {self.plan.layout.streams_per_rank} workers, loader has {num_workers}")
        yield from self.iter_worker(worker)

    def iter_worker(self, worker: int) -> Iterator[TrainBatch]:
        """The batches of loader worker `worker`, in plan order (audits also call it without processes)."""
        plan, B = self.plan, self.plan.layout.local_batch_size
        W = plan.layout.streams_per_rank
        # The loader asks worker 0 first, so loader worker k serves steps start+k, start+k+W, ...; in the plan
        # those steps belong to stream (start + k) % W.
        first = self.start_step + worker
        stream = first % W
        reader = ShardReader(self.manifest, self.storage)
        sources: dict[str, Iterator[Any]] = {}
        last_good: dict[str, dict[str, Any]] = {}
        num_bad = 0
        try:
            for step in range(first, plan.num_steps, W):
                group = plan.schedule[step]
                if group not in sources:
                    ranges = plan.stream_ranges(group, stream, self.rank, plan.step_index[step])
                    sources[group] = _Lookahead(iter_positions(plan.orders[group], ranges, reader))
                rows = [sources[group].next() for _ in range(B)]
                bad = [row for row in rows if isinstance(row, BadSample)]
                num_bad += len(bad)
                if num_bad > self.max_bad_samples:
                    raise ValueError(
                        f"{bad[-1].reason}: {num_bad} unreadable samples in one loader worker exceed "
                        f"data.max_bad_samples={self.max_bad_samples}"
                    )
                if bad and all(isinstance(row, BadSample) for row in rows) and group not in last_good:
                    last_good[group] = sources[group].first_good()  # a later sample of this stream stands in
                rows = self._substitute(rows, bad, last_good.get(group), group)
                last_good[group] = rows[-1]
                yield self.collator(rows, {"bad_samples": len(bad), "step": step})
        finally:
            reader.close()

    @staticmethod
    def _substitute(rows: list, bad: list[BadSample], fallback: dict | None, group: str) -> list[dict]:
        if not bad:
            return rows
        good = next((row for row in rows if not isinstance(row, BadSample)), fallback)
        if good is None:
            raise ValueError(
                f"{bad[0].reason}: no sample of this worker's stream of group {group!r} is readable, so none can "
                "stand in for the unreadable ones; fix or rebuild the shards"
            )
        for reason in {b.reason for b in bad}:
            log.warning("skipping unreadable sample(s): %s", reason)
        return [good if isinstance(row, BadSample) else row for row in rows]


class _Lookahead:
    """A stream of samples that can search ahead for a readable one without consuming anything."""

    def __init__(self, samples: Iterator[Any]):
        self.samples = samples
        self.buffer: deque[Any] = deque()

    def next(self) -> Any:
        return self.buffer.popleft() if self.buffer else next(self.samples)

    def first_good(self) -> dict[str, Any] | None:
        for row in self.buffer:
            if not isinstance(row, BadSample):
                return row
        for row in self.samples:
            self.buffer.append(row)
            if not isinstance(row, BadSample):
                return row
        return None


def _identity(batch: TrainBatch) -> TrainBatch:
    return batch


class TrainStream:
    """This rank's batches, epoch after epoch; its position is checkpointed through `state_dict()`.

    `__iter__` yields from the current position to the end of the current epoch, then moves to the next one.
    """

    def __init__(self, dataset: PlanDataset, planner: Position, num_workers: int):
        self.dataset = dataset
        self.planner = planner
        self.num_workers = num_workers
        self.in_process = False  # True: run the workers' code in this process (audits); same batches, same order
        self.stats: dict[str, int] = {"bad_samples": 0, "truncated_texts": 0, "samples": 0, "remainder": 0}

    @property
    def steps_per_epoch(self) -> int:
        """Global steps of the current epoch; identical on every rank."""
        return self.planner.plan().num_steps

    @property
    def epoch(self) -> int:
        return self.planner.epoch

    @property
    def step(self) -> int:
        """Steps of the current epoch already consumed."""
        return self.planner.step

    def state_dict(self) -> dict:
        return self.planner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.planner.load_state_dict(state)

    def _batches(self) -> Iterator[TrainBatch]:
        if not self.in_process:
            yield from DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity)
            return
        # The DataLoader's in-order round robin over its workers, without the processes (audits, tests).
        workers = [self.dataset.iter_worker(w) for w in range(max(self.num_workers, 1))]
        finished: set[int] = set()
        worker = 0
        while len(finished) < len(workers):
            if worker not in finished:
                batch = next(workers[worker], None)
                if batch is None:
                    finished.add(worker)
                else:
                    yield batch
            worker = (worker + 1) % len(workers)

    def __iter__(self) -> Iterator[TrainBatch]:
        plan = self.planner.plan()
        if self.planner.step >= plan.num_steps and self.planner.step > 0:  # finished but not yet advanced
            self.planner.advance_epoch()
            plan = self.planner.plan()
        self.stats["remainder"] = sum(plan.remainder.values())
        self.stats["excluded"] = plan.excluded
        if self.planner.step < plan.num_steps:
            self.dataset.configure(plan, self.planner.step)
            for batch in self._batches():
                self.planner.step += 1
                for name, value in batch.stats.items():
                    if name != "step":
                        self.stats[name] = self.stats.get(name, 0) + value
                yield batch
        if self.stats["remainder"]:
            log.info(
                "epoch %d leaves %d samples (%s) that do not fill a global batch; carried into epoch %d",
                self.planner.epoch,
                self.stats["remainder"],
                plan.remainder,
                self.planner.epoch + 1,
            )
        self.planner.advance_epoch()


def build_train_stream(
    data: DataConfig, model: ModelConfig | None, tokenizer, *, rank: int, world_size: int
) -> TrainStream:
    """The stream of rank `rank` of `world_size`; `tokenizer=None` skips tokenization (audits, dry runs)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    storage = Storage(data.shards)
    manifest = load_manifest(storage)
    if data.verify_sha256:  # each rank hashes its share of the shards; a mismatch anywhere fails the run
        shares = list(range(rank, len(manifest.shards), world_size))
        for index in verify_shards(manifest, storage, shares):
            log.warning(
                "%s: shard missing from storage; its samples will be skipped and counted",
                storage.url(manifest.shards[index].path),
            )
    layout = Layout(world_size, max(data.num_workers, 1), data.global_batch_size)
    position = Position(manifest, layout, data.mode, data.seed, data.shuffle_buffer, data.task_weights)
    if model is None:
        collator = Collator(tokenizer, 0, data.num_negatives)
    else:
        collator = Collator(tokenizer, model.max_length, data.num_negatives, model.prompts, model.default_prompt)
    dataset = PlanDataset(manifest, storage, collator, rank, data.max_bad_samples)
    return TrainStream(dataset, position, data.num_workers)
