"""Shared helpers of the data tests: tiny datasets built with the real build, a plain-webdataset reference reader,
and a driver that steps every rank's real TrainStream together, as ranks meet at each collective."""

from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds

from gemb_dist.config import DataConfig
from gemb_dist.data.build import build_shards
from gemb_dist.data.reader import TrainStream, build_train_stream


def write_jsonl(path: Path, counts: dict[str, int], num_negatives: int = 0) -> list[dict]:
    samples = []
    for task, count in counts.items():
        for i in range(count):
            negs = [f"{task} negative {i}.{k}" for k in range(i % (num_negatives + 1))]
            samples.append(
                {"task": task, "query": f"{task} query {i}", "positive": f"{task} doc {i}", "negatives": negs}
            )
    # interleave tasks the way real mixtures arrive
    samples.sort(key=lambda s: (int(s["query"].rsplit(" ", 1)[1]), s["task"]))
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return samples


def make_dataset(root: Path, counts: dict[str, int], samples_per_shard: int, num_negatives: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "in.jsonl", counts, num_negatives)
    build_shards([str(root / "in.jsonl")], str(root / "shards"), samples_per_shard=samples_per_shard)
    return root / "shards"


def reference_ids(shards: Path) -> dict[str, str]:
    """id -> task of every sample, read with a plain webdataset pipeline (independent of the reader under test)."""
    urls = sorted(str(p) for p in shards.glob("shard-*.tar"))
    return {s["json"]["id"]: s["json"]["task"] for s in wds.WebDataset(urls, shardshuffle=False).decode()}


def streams(data: DataConfig, world_size: int, in_process: bool = True) -> list[TrainStream]:
    out = [build_train_stream(data, None, None, rank=r, world_size=world_size) for r in range(world_size)]
    for stream in out:
        stream.in_process = in_process
    return out


def run_epoch(ranks: list[TrainStream], max_steps: int | None = None) -> list[list]:
    """One pass of `for batch in stream` on every rank in lockstep: per step, each rank's batch (None if it ran out)."""
    iterators = [iter(s) for s in ranks]
    steps = []
    while max_steps is None or len(steps) < max_steps:
        batches = [next(it, None) for it in iterators]
        if all(b is None for b in batches):
            break
        steps.append(batches)
    if max_steps is not None:
        for it in iterators:
            it.close()
    return steps
