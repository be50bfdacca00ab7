"""The training loop: steps over the data stream, one gradient-cached optimizer step each, with metrics,
progress, checkpoints and (for tests and chaos drills) an injected fault. Parts are built elsewhere and injected.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from gemb_dist.config import GembConfig
from gemb_dist.data import TrainStream
from gemb_dist.distributed import all_reduce_mean, all_reduce_sum
from gemb_dist.train.checkpoint import Checkpointer
from gemb_dist.train.engine import StepMetrics, TrainEngine
from gemb_dist.train.tracking import Tracker

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """Raised by `train.fault_injection` to exercise worker-failure recovery."""


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]


def iter_batches(stream: TrainStream) -> Iterator:
    """The batches of `stream`, fetched without touching the global torch RNG that dropout draws from.

    A DataLoader draws its base seed from the global generator when its iterator starts (on the first batch).
    Training starts it before step 1, a resumed run right after restoring the checkpoint's RNG state: without
    this, a resumed run's dropout masks would be one draw off the uninterrupted run's (exactly-once, not exact).
    """
    iterator = iter(stream)
    while True:
        state = torch.get_rng_state()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        finally:
            torch.set_rng_state(state)
        yield batch


def planned_steps(config: GembConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: `train.epochs` passes, capped by `train.max_steps`."""
    if steps_per_epoch <= 0:
        raise ValueError(
            f"data.shards ({config.data.shards}) holds fewer samples than one global batch "
            f"(data.global_batch_size={config.data.global_batch_size}); nothing to train on"
        )
    total = config.train.epochs * steps_per_epoch
    return min(total, config.train.max_steps) if config.train.max_steps else total


class Trainer:
    def __init__(
        self,
        config: GembConfig,
        engine: TrainEngine,
        stream: TrainStream,
        checkpointer: Checkpointer,
        tracker: Tracker,
        *,
        rank: int,
        run_dir: Path,
        total_steps: int,
        start_step: int = 0,
        logged_through: int = 0,
    ):
        self.config, self.engine, self.stream = config, engine, stream
        self.checkpointer, self.tracker = checkpointer, tracker
        self.rank, self.run_dir = rank, Path(run_dir)
        self.total_steps, self.start_step = total_steps, start_step
        # Steps after the checkpoint that an earlier attempt already delivered to MLflow: a restarted group
        # replays them (with the same values: resume is exact) but must not log them twice.
        self.logged_through = logged_through
        self.sample_log = self.run_dir / "samples" / f"rank{rank}.jsonl"
        self.sample_log.parent.mkdir(parents=True, exist_ok=True)

    def train(self) -> TrainResult:
        """Run from `start_step` to `total_steps`; checkpoints every `train.checkpoint_every` and at the end."""
        step, metrics = self.start_step, {}
        progress = tqdm(
            total=self.total_steps, initial=step, desc=self.config.train.stage, disable=self.rank != 0, mininterval=1.0
        )
        while step < self.total_steps:
            for batch in iter_batches(self.stream):
                step += 1
                self._maybe_inject_fault(step)
                started = time.perf_counter()
                step_metrics = self.engine.train_step(batch)
                self._record_samples(step, batch.sample_ids)
                metrics = self._metrics(step_metrics, time.perf_counter() - started)
                due = step % self.config.mlflow.log_every == 0 or step == self.total_steps
                if due and step > self.logged_through:
                    self.tracker.log(metrics, step=step)
                progress.update(1)
                if step % self.config.train.log_every == 0:
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                if self.checkpointer.due(step) or step == self.total_steps:
                    self.checkpointer.save(step, metrics, {"mlflow_run_id": self.tracker.run_id})
                if step >= self.total_steps:
                    break
        progress.close()
        return TrainResult(step=step, metrics=metrics)

    def _metrics(self, m: StepMetrics, seconds: float) -> dict[str, float]:
        """Rank-averaged loss/accuracy per MRL dim, global throughput, rank 0's time split, data counters."""
        dims = sorted(m.per_dim_loss)
        means = all_reduce_mean(
            torch.tensor(
                [m.loss, *(m.per_dim_loss[d] for d in dims), *(m.per_dim_accuracy[d] for d in dims)],
                dtype=torch.float64,
            )
        )
        totals = all_reduce_sum(torch.tensor([m.num_examples, m.num_tokens], dtype=torch.float64))
        metrics = {"loss": means[0].item(), "lr": m.lr, "grad_norm": m.grad_norm}
        for i, d in enumerate(dims):
            metrics[f"loss_dim{d}"] = means[1 + i].item()
            metrics[f"accuracy_dim{d}"] = means[1 + len(dims) + i].item()
        metrics["examples_per_s"] = totals[0].item() / seconds
        metrics["tokens_per_s"] = totals[1].item() / seconds
        metrics.update({f"time_{name}_s": value for name, value in m.seconds.items()})
        stats = self.stream.stats
        metrics["bad_samples"] = float(stats.get("bad_samples", 0))
        metrics["truncated_texts"] = float(stats.get("truncated_texts", 0))
        metrics["data_remainder"] = float(stats.get("remainder", 0))
        metrics["epoch"] = float(self.stream.epoch)
        return metrics

    def _record_samples(self, step: int, sample_ids: list[str]) -> None:
        """Append the ids this rank consumed at `step` (the data audit of restarts reads them)."""
        with self.sample_log.open("a") as f:
            f.write(json.dumps({"step": step, "resumed_from": self.start_step, "ids": sample_ids}) + "\n")

    def _maybe_inject_fault(self, step: int) -> None:
        fault = self.config.train.fault_injection
        if fault is None or fault.rank != self.rank or fault.step != step:
            return
        marker = self.run_dir / f"fault_injected_rank{self.rank}_step{step}"
        if marker.exists():  # only the first attempt fails; the restarted group must get past this step
            return
        marker.touch()
        raise InjectedFault(f"train.fault_injection: rank {self.rank} fails at step {step}")
