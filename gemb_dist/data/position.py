"""The stream position (epoch, steps consumed, carried remainder) and the plan it implies; checkpointable.

A saved position is plain JSON-able data. Resuming under the same layout continues at the saved step. Resuming
under another layout (world size, workers per rank or global batch size) re-partitions: the previous plan's
unconsumed samples of the epoch become a view that a fresh plan splits across the new layout, so nothing
consumed is repeated and nothing unconsumed is lost.
"""

from __future__ import annotations

import logging

from gemb_dist.data.manifest import Manifest
from gemb_dist.data.plan import EpochPlan, Item, Layout, epoch_orders, seed_sequence

log = logging.getLogger(__name__)
STATE_FORMAT = 1


class Position:
    def __init__(
        self,
        manifest: Manifest,
        layout: Layout,
        mode: str,
        seed: int,
        block_size: int,
        task_weights: dict[str, float] | None,
    ):
        self.manifest = manifest
        self.layout = layout
        self.mode = mode
        self.seed = seed
        self.block_size = block_size
        self.task_weights = task_weights if mode == "finetune" else None
        self.epoch = 0
        self.step = 0
        self.generation = 0  # bumped by every re-partition within the epoch
        self.views: dict[str, list[tuple[int, int]]] | None = None  # None: the whole epoch
        self.carry: dict[str, list[Item]] = {}
        self._plan: tuple[tuple, EpochPlan] | None = None

    def _make_plan(self, layout: Layout) -> EpochPlan:
        orders = epoch_orders(self.manifest, self.mode, self.seed, self.epoch, self.carry, self.block_size)
        schedule_seed = seed_sequence(self.seed, self.epoch, self.generation, "schedule")
        return EpochPlan(orders, layout, schedule_seed, self.task_weights, self.views)

    def plan(self) -> EpochPlan:
        key = (self.epoch, self.generation)
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, self._make_plan(self.layout))
        return self._plan[1]

    def advance_epoch(self) -> None:
        """Carry this epoch's remainder to the front of the next epoch and start it."""
        self.carry = self.plan().remainder_items()
        self.epoch += 1
        self.step, self.generation, self.views = 0, 0, None

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "fingerprint": self.manifest.fingerprint,
            "mode": self.mode,
            "seed": self.seed,
            "block_size": self.block_size,
            "task_weights": self.task_weights,
            "layout": [self.layout.world_size, self.layout.num_workers, self.layout.global_batch_size],
            "epoch": self.epoch,
            "step": self.step,
            "generation": self.generation,
            "views": None if self.views is None else {g: [list(r) for r in v] for g, v in self.views.items()},
            "carry": {g: [list(item) for item in items] for g, items in self.carry.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"data stream state has format {state.get('format')!r}, expected {STATE_FORMAT}")
        for name in ("fingerprint", "mode", "seed", "block_size", "task_weights"):
            mine = self.manifest.fingerprint if name == "fingerprint" else getattr(self, name)
            if state[name] != mine:
                raise ValueError(
                    f"cannot resume the data stream: its {name} was {state[name]!r} and is now {mine!r} "
                    "(the saved position only makes sense for the same shards and data settings)"
                )
        self.epoch, self.step, self.generation = state["epoch"], state["step"], state["generation"]
        self.views = None if state["views"] is None else {g: [tuple(r) for r in v] for g, v in state["views"].items()}
        self.carry = {g: [tuple(item) for item in items] for g, items in state["carry"].items()}
        self._plan = None
        saved = Layout(*state["layout"])
        if saved == self.layout:
            self.plan().unconsumed_views(self.step)  # validates the step against the plan
            return
        old_plan = self._make_plan(saved)
        self.views = old_plan.unconsumed_views(self.step)
        self.generation += 1
        log.info(
            "data stream resumed under a new layout %s (saved under %s): re-partitioning the %d unconsumed samples "
            "of epoch %d after %d steps",
            self.layout,
            saved,
            sum(b - a for v in self.views.values() for a, b in v),
            self.epoch,
            self.step,
        )
        self.step = 0
