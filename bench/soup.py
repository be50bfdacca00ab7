"""Peak memory of a model soup does not grow with the number of ingredients.

    python bench/soup.py [--ingredient-mb 200] [--tensors 8]

Builds 8 random safetensors ingredients of ~200 MB in a temp dir, then averages 2 and 8 of them, each in a fresh
subprocess, and reads the child's peak RSS (ru_maxrss). Prints one JSON line; `ok` is peak(8) <= 1.2 x peak(2).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_RATIO = 1.2


def build_ingredients(root: Path, count: int, ingredient_mb: int, num_tensors: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    numel = ingredient_mb * 2**20 // 4 // num_tensors
    paths = []
    for n in range(count):
        gen = torch.Generator().manual_seed(n)
        tensors = {f"layer{k}.weight": torch.randn(numel, generator=gen).view(-1, 256) for k in range(num_tensors)}
        path = root / f"ingredient{n}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
        del tensors
    return paths


def child(paths: list[str], out: str) -> None:
    """Average `paths` into `out` and print this process's peak RSS (MB) before and after."""
    import torch

    from gemb_dist.soup import average_state_dicts

    torch.set_num_threads(1)
    before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    average_state_dicts(paths, None, out)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"baseline_mb": before_mb, "peak_mb": peak_mb, "seconds": seconds}))


def measure(paths: list[Path], out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(out), *map(str, paths)]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ingredient-mb", type=int, default=200)
    parser.add_argument("--tensors", type=int, default=8, help="tensors per ingredient")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[1:], args.child[0])
        return
    with tempfile.TemporaryDirectory(prefix="gemb-soup-bench-") as tmp:
        root = Path(tmp)
        paths = build_ingredients(root, 8, args.ingredient_mb, args.tensors)
        two = measure(paths[:2], root / "soup2.safetensors")
        eight = measure(paths, root / "soup8.safetensors")
    ratio = eight["peak_mb"] / two["peak_mb"]
    report = {
        "bench": "soup_peak_rss",
        "ingredient_mb": args.ingredient_mb,
        "tensor_mb": round(args.ingredient_mb / args.tensors, 1),
        "peak_rss_mb_2": round(two["peak_mb"], 1),
        "peak_rss_mb_8": round(eight["peak_mb"], 1),
        "rss_before_soup_mb": round(two["baseline_mb"], 1),
        "growth_mb_2": round(two["peak_mb"] - two["baseline_mb"], 1),
        "growth_mb_8": round(eight["peak_mb"] - eight["baseline_mb"], 1),
        "seconds_2": round(two["seconds"], 2),
        "seconds_8": round(eight["seconds"], 2),
        "ratio": round(ratio, 3),
        "max_ratio": MAX_RATIO,
        "ok": ratio <= MAX_RATIO,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
