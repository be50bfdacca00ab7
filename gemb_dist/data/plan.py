"""The deterministic epoch plan: which samples every (rank, step) consumes, computed from the manifest alone.

Every rank computes the same plan from (manifest, mode, seed, epoch, layout), so all ranks agree on the number
of steps (no rank waits in a collective for a batch that never comes) and every sample is consumed exactly once.

Order of one epoch, per *group* (a task in fine-tuning mode, all samples in pre-finetuning mode):
  1. the samples carried over from the previous epoch's remainder, then
  2. the group's shard segments in a seeded shard order, shuffled within consecutive *blocks* of
     `block_size` positions (block size = `data.shuffle_buffer`).
A block is the unit of memory and of mixing: a worker holds at most about one block of samples per group, and
samples mix only within a block (plus the shard order). Larger blocks shuffle better and cost memory; blocks
of about one or two shards read each shard about once.

Steps: a group with `n` samples gives `n // G` global steps (G = global batch size); the last `n % G`
positions are the remainder, carried to the front of the next epoch. In fine-tuning mode a seeded schedule,
shared by all ranks, orders the groups' steps, so every global step draws from one task.

Streams: the (group, worker w, rank r) triple owns a contiguous range of the group's order holding exactly
the samples of its local batches; worker w serves the steps `s % num_workers == w`, so the DataLoader's
in-order round robin over workers yields the plan's steps in order, and each worker reads only the shards
of its own ranges. A *view* (list of position ranges) restricts the order to samples not yet consumed;
a resume under another layout builds a fresh plan over the previous plan's unconsumed view.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from gemb_dist.data.manifest import Manifest

ALL_TASKS = "*"  # the one group of pre-finetuning mode
Item = tuple[int, int]  # (shard index, sample index within the shard)
Ranges = list[tuple[int, int]]  # half-open position ranges, in order


@dataclass(frozen=True)
class Layout:
    """How a global batch is split: `world_size` ranks, `num_workers` loader workers per rank (0 counts as 1)."""

    world_size: int
    num_workers: int
    global_batch_size: int

    def __post_init__(self):
        if self.world_size <= 0 or self.global_batch_size <= 0:
            raise ValueError(f"world size and global batch size must be positive, got {self}")
        if self.global_batch_size % self.world_size:
            raise ValueError(
                f"data.global_batch_size ({self.global_batch_size}) must be divisible by the world size "
                f"({self.world_size})"
            )

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def streams_per_rank(self) -> int:
        return max(self.num_workers, 1)


def seed_sequence(*parts: int | str) -> list[int]:
    return [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]


class GroupOrder:
    """The base order of one group's samples in one epoch; `items(a, b)` maps positions to (shard, index)."""

    def __init__(self, carry: list[Item], segments: list[tuple[int, int, int]], block_size: int, seed: list[int]):
        self.carry = np.asarray(carry, dtype=np.int64).reshape(-1, 2)
        self.seg_shard = np.asarray([s for s, _, _ in segments], dtype=np.int64)
        self.seg_start = np.asarray([a for _, a, _ in segments], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum([b - a for _, a, b in segments], dtype=np.int64)])
        self.block_size = block_size
        self.seed = seed
        self._perm_cache: dict[int, np.ndarray] = {}

    @property
    def size(self) -> int:
        return len(self.carry) + int(self.offsets[-1])

    def _block_perm(self, block: int) -> np.ndarray:
        perm = self._perm_cache.get(block)
        if perm is None:
            length = min(self.block_size, int(self.offsets[-1]) - block * self.block_size)
            perm = np.random.default_rng([*self.seed, block]).permutation(length)
            if len(self._perm_cache) > 8:
                self._perm_cache.clear()
            self._perm_cache[block] = perm
        return perm

    def items(self, start: int, stop: int) -> np.ndarray:
        """[stop - start, 2] array of (shard, index) for positions start..stop-1."""
        assert 0 <= start <= stop <= self.size, (start, stop, self.size)
        num_carry = len(self.carry)
        parts = [self.carry[start : min(stop, num_carry)]] if start < num_carry else []
        first = max(start, num_carry) - num_carry
        last = stop - num_carry
        if first < last:
            if self.block_size > 0:
                sources = []
                pos = first
                while pos < last:
                    block, offset = divmod(pos, self.block_size)
                    end = min(last, (block + 1) * self.block_size)
                    sources.append(block * self.block_size + self._block_perm(block)[offset : offset + end - pos])
                    pos = end
                source = np.concatenate(sources)
            else:
                source = np.arange(first, last, dtype=np.int64)
            seg = np.searchsorted(self.offsets, source, side="right") - 1
            parts.append(np.stack([self.seg_shard[seg], self.seg_start[seg] + source - self.offsets[seg]], axis=1))
        return np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)

    def block_of(self, position: int) -> int:
        """Positions in one block are mixed together; the carry counts as block -1."""
        num_carry = len(self.carry)
        if position < num_carry or self.block_size <= 0:
            return -1 if position < num_carry else 0
        return (position - num_carry) // self.block_size


def epoch_orders(
    manifest: Manifest, mode: str, seed: int, epoch: int, carry: dict[str, list[Item]], block_size: int
) -> dict[str, GroupOrder]:
    """Every group's base order for `epoch` (groups sorted by name, so all ranks enumerate them identically)."""
    shard_order = np.random.default_rng(seed_sequence(seed, epoch, "shards")).permutation(len(manifest.shards))
    segments: dict[str, list[tuple[int, int, int]]] = {}
    for shard_index in shard_order.tolist():
        start = 0
        for task, count in manifest.shards[shard_index].task_runs:
            group = task if mode == "finetune" else ALL_TASKS
            segments.setdefault(group, []).append((shard_index, start, start + count))
            start += count
    for group in carry:
        segments.setdefault(group, [])
    return {
        group: GroupOrder(carry.get(group, []), segments[group], block_size, seed_sequence(seed, epoch, group, "block"))
        for group in sorted(segments)
    }


def _schedule(steps: dict[str, int], weights: dict[str, float] | None, seed: list[int]) -> list[str]:
    """Order of the groups' global steps: uniform over steps (tasks interleave by size), or by task weight."""
    groups = [g for g in steps for _ in range(steps[g])]
    rng = np.random.default_rng(seed)
    if weights is None or len(steps) <= 1:
        return [groups[i] for i in rng.permutation(len(groups))]
    # Weighted sampling without replacement (exponential keys): a task is drawn with probability proportional
    # to its weight while its steps last; each step unit gets weight w_t / steps_t.
    unit = np.asarray([weights[g] / steps[g] for g in groups])
    keys = np.log(rng.random(len(groups))) / unit
    return [groups[i] for i in np.argsort(-keys, kind="stable")]


def _ranges_length(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


def _slice_ranges(ranges: Ranges, start: int, stop: int) -> Ranges:
    """The base ranges holding virtual positions [start, stop) of the concatenation of `ranges`."""
    out, offset = [], 0
    for a, b in ranges:
        lo, hi = max(start, offset), min(stop, offset + b - a)
        if lo < hi:
            out.append((a + lo - offset, a + hi - offset))
        offset += b - a
        if offset >= stop:
            break
    return out


def _merge(ranges: Ranges) -> Ranges:
    merged: Ranges = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


class EpochPlan:
    """Global steps of one epoch (or of its unconsumed part, given `views`) under one layout."""

    def __init__(
        self,
        orders: dict[str, GroupOrder],
        layout: Layout,
        schedule_seed: list[int],
        task_weights: dict[str, float] | None = None,
        views: dict[str, Ranges] | None = None,
    ):
        self.orders = orders
        self.layout = layout
        self.views = {g: list(views[g]) if views else [(0, orders[g].size)] for g in orders}
        self.excluded = 0
        if task_weights is not None:
            unknown = sorted(set(task_weights) - set(orders))
            missing = sorted(set(orders) - set(task_weights))
            if unknown or missing:
                raise ValueError(
                    f"data.task_weights must name exactly the dataset's tasks; unknown: {unknown}, missing: {missing}"
                )
            for group, weight in task_weights.items():
                if weight <= 0:  # weight 0 leaves a task out of training; its samples are counted as excluded
                    self.excluded += _ranges_length(self.views[group])
                    self.views[group] = []
        G = layout.global_batch_size
        self.group_steps = {g: _ranges_length(v) // G for g, v in self.views.items()}
        self.schedule = _schedule({g: n for g, n in self.group_steps.items() if n}, task_weights, schedule_seed)
        self._index_streams()

    def _index_streams(self) -> None:
        W, R, B = self.layout.streams_per_rank, self.layout.world_size, self.layout.local_batch_size
        self.step_index = []  # step -> index of the step within its (group, worker) stream
        counts: dict[tuple[str, int], int] = {}
        for step, group in enumerate(self.schedule):
            key = (group, step % W)
            self.step_index.append(counts.get(key, 0))
            counts[key] = counts.get(key, 0) + 1
        self.stream_steps = counts
        self.stream_offset: dict[tuple[str, int, int], int] = {}  # (group, worker, rank) -> virtual offset
        for group in self.orders:
            offset = 0
            for worker in range(W):
                for rank in range(R):
                    self.stream_offset[group, worker, rank] = offset
                    offset += counts.get((group, worker), 0) * B

    @property
    def num_steps(self) -> int:
        return len(self.schedule)

    @property
    def remainder(self) -> dict[str, int]:
        G = self.layout.global_batch_size
        return {g: _ranges_length(v) - self.group_steps[g] * G for g, v in self.views.items()}

    def stream_ranges(self, group: str, worker: int, rank: int, first_index: int = 0) -> Ranges:
        """Base positions of the local batches `first_index..` of one stream, in consumption order."""
        B = self.layout.local_batch_size
        offset = self.stream_offset[group, worker, rank]
        count = self.stream_steps.get((group, worker), 0)
        return _slice_ranges(self.views[group], offset + first_index * B, offset + count * B)

    def local_batch_items(self, step: int, rank: int) -> tuple[str, np.ndarray]:
        """(group, [B, 2] items) of one rank's batch at `step`; the readers stream the same thing in bulk."""
        group = self.schedule[step]
        B = self.layout.local_batch_size
        start = self.stream_offset[group, step % self.layout.streams_per_rank, rank] + self.step_index[step] * B
        order = self.orders[group]
        return group, np.concatenate([order.items(a, b) for a, b in _slice_ranges(self.views[group], start, start + B)])

    def remainder_items(self) -> dict[str, list[Item]]:
        """The samples this epoch leaves over, to be carried to the front of the next epoch."""
        carry = {}
        for group, view in self.views.items():
            n = _ranges_length(view)
            ranges = _slice_ranges(view, n - self.remainder[group], n)
            if ranges:
                order = self.orders[group]
                carry[group] = [tuple(x) for x in np.concatenate([order.items(a, b) for a, b in ranges]).tolist()]
        return carry

    def unconsumed_views(self, steps_done: int) -> dict[str, Ranges]:
        """Position ranges not yet consumed after the first `steps_done` steps (remainder included)."""
        if not 0 <= steps_done <= self.num_steps:
            raise ValueError(f"a saved data position of {steps_done} steps exceeds this epoch's {self.num_steps}")
        done: dict[tuple[str, int], int] = {}
        for step in range(steps_done):
            key = (self.schedule[step], step % self.layout.streams_per_rank)
            done[key] = done.get(key, 0) + 1
        views = {}
        for group in self.orders:
            pieces: Ranges = []
            for worker in range(self.layout.streams_per_rank):
                for rank in range(self.layout.world_size):
                    pieces += self.stream_ranges(group, worker, rank, done.get((group, worker), 0))
            n = _ranges_length(self.views[group])
            pieces += _slice_ranges(self.views[group], n - self.remainder[group], n)
            views[group] = _merge(pieces)
        return views
