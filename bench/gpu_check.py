"""Every GPU check plus the 0.5B throughput benchmark against sentence-transformers, as one command; prints JSON.

    python bench/gpu_check.py                 # on a CUDA machine (H200: well under 8 minutes)
    python bench/gpu_check.py --cpu-dry-run   # the same code at tiny sizes on CPU, to know it works beforehand

Needs torch, transformers and sentence-transformers only: no pytest, DeepSpeed, Ray, MLflow or WebDataset. When
pydantic is missing (gemb_dist.config needs it), the wheels that `bench/gpu_wheels.sh` put in `bench/.gpu_wheels`
are unpacked into a temp dir on sys.path (and PYTHONPATH, for the benchmark's processes).

Throughput: a Qwen2-0.5B-shaped backbone (Qwen2Config with hidden 896, 24 layers, intermediate 4864, 14 heads,
2 KV heads; random init, the all-MiniLM-L6-v2 tokenizer and its vocabulary) made bidirectional, saved to a temp
dir and loaded from there by both sides, trained by `bench/peer.py --systems peer,library` in bf16 (autocast, fp32
weights) on docstring text up to 512 tokens at global batch 4096. MFU = 6 x parameters x real tokens/s over the
GPU's bf16 dense peak (989 TFLOP/s for H100/H200): the 6N counts one forward and one backward per token; the
gradient cache's extra no-grad forward (2N) is overhead and is not counted, nor is padding. `hfu` counts what the
hardware did: 8N per computed (padded) token. Attention FLOPs are left out of both (under 10% at these lengths).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                 num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1_000_000.0)  # fmt: skip
QWEN2_TINY = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip


# gemb_dist's bidirectional decoders need transformers >= 5.2 (`config.is_causal = False`, see gemb_dist.attention)
# and its 5.x names (`PreTrainedConfig`): pyproject.toml allows 5.0-5.1 as well, but the checks run Qwen2 bidirectional.
TRANSFORMERS_RANGE = ((5, 2), (6, 0))


def check_transformers_version(version: str) -> None:
    """Refuse, before any check runs, a transformers the GPU checks cannot run on (the image's own one)."""
    parts = version.split(".")
    try:
        found = (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0))
    except (IndexError, ValueError):
        raise SystemExit(f"gpu_check: cannot read the transformers version {version!r}") from None
    low, high = TRANSFORMERS_RANGE
    if not low <= found < high:
        raise SystemExit(
            f"gpu_check: transformers {version} is installed; gemb_dist needs >={low[0]}.{low[1]},<{high[0]} "
            "(bidirectional decoders through config.is_causal=False). Use a Python with a transformers 5.x, or carry "
            "a transformers 5.x wheel and its dependencies like bench/gpu_wheels.sh does for pydantic"
        )


WHEELS = {"pydantic": "pydantic-", "pydantic_core": "pydantic_core-", "annotated_types": "annotated_types-",
          "typing_inspection": "typing_inspection-"}  # fmt: skip


def bring_wheels(missing: list[str] | None = None) -> str | None:
    """Unpack the carried wheels of the missing modules; returns the dir put on sys.path (None if none needed)."""
    needed = WHEELS
    if missing is None:
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    wheels = BENCH / ".gpu_wheels"
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    target = Path(tempfile.mkdtemp(prefix="gemb-wheels-"))
    for module in missing:
        found = [
            w for w in sorted(wheels.glob(f"{needed[module]}*.whl")) if "-cp" not in w.name or f"-{tag}-" in w.name
        ]
        if not found:
            raise SystemExit(f"{wheels}: no wheel of {module} for {tag}; run bench/gpu_wheels.sh and carry the folder")
        with zipfile.ZipFile(found[0]) as whl:
            whl.extractall(target)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    return str(target)


def run_check(name: str, fn, *args, **kwargs) -> dict:
    start = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
    except Exception:  # a check that crashes is reported as failed, and the others still run
        result = {"check": name, "ok": False, "error": traceback.format_exc()[-2000:]}
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"gpu_check: {name}: ok={result['ok']} ({result['seconds']} s)", file=sys.stderr, flush=True)
    return result


def save_backbone(shape: dict, directory: str) -> dict:
    """A random bidirectional Qwen2 backbone with the MiniLM tokenizer, saved as a plain HF dir; returns its sizes."""
    import torch
    from gpu_checks import tokenizer_path
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

    from gemb_dist.attention import set_attention

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path())
    torch.manual_seed(0)
    backbone = Qwen2Model(Qwen2Config(vocab_size=len(tokenizer), **shape))
    set_attention(backbone, "bidirectional")  # stored in config.json: sentence-transformers loads it bidirectional
    backbone.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    params = sum(p.numel() for p in backbone.parameters())
    return {"params": params, "embedding_params": backbone.embed_tokens.weight.numel()}


def throughput(device: str, dry_run: bool, peak_tflops: float, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="gemb-qwen2-") as model_dir:
        sizes = save_backbone(QWEN2_TINY if dry_run else QWEN2_05B, model_dir)
        batch, chunk, length, steps = (16, 8, 64, 1) if dry_run else (4096, 64, 512, 2)
        cmd = [sys.executable, str(BENCH / "peer.py"), "--model", model_dir, "--systems", "peer,library",
               "--device", device, "--precision", "bf16", "--global-batch", str(batch), "--chunk", str(chunk),
               "--max-length", str(length), "--steps", str(steps), "--rounds", "1",
               "--mrl-dims", "16,32,64" if dry_run else "96,192,384",
               "--timeout", str(timeout)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=2 * timeout + 120)
    if done.returncode != 0:
        return {"check": "throughput_qwen2_0.5b", "ok": False, "error": done.stderr[-3000:]}
    bench = json.loads(done.stdout.strip().splitlines()[-1])
    params = sizes["params"]
    for row in bench["systems"].values():
        row["mfu"] = round(6 * params * row["real_tokens_per_s"] / (peak_tflops * 1e12), 4)
        row["hfu"] = round(8 * params * row["computed_tokens_per_s"] / (peak_tflops * 1e12), 4)
    library, peer = bench["systems"]["library"], bench["systems"]["peer"]
    return {"check": "throughput_qwen2_0.5b" if not dry_run else "throughput_qwen2_tiny", **sizes,
            "peak_tflops": peak_tflops, "ratio_examples_per_s": library["ratio_examples_per_s"],
            "mfu_library": library["mfu"], "mfu_peer": peer["mfu"], "bench": bench,
            "ok": True}  # fmt: skip
    # "ok" is True for any completed run: the throughput targets are measurements to report, not assertions.


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on CPU (no GPU needed)")
    parser.add_argument("--skip-throughput", action="store_true", help="only the correctness and memory checks")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's bf16 dense peak (H100/H200: 989)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one benchmark system may take")
    args = parser.parse_args()
    started = time.perf_counter()
    wheels_dir = bring_wheels()
    sys.path[:0] = [str(ROOT), str(BENCH)]
    import transformers

    check_transformers_version(transformers.__version__)
    import gpu_checks as g
    import torch

    device = "cpu" if args.cpu_dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible to torch; use --cpu-dry-run to try the code on CPU")
    import sentence_transformers

    memory = dict(small=8, large=64, chunk=8, max_length=32) if args.cpu_dry_run else {}
    results = [run_check(f"cached_equals_plain_{k}_{p}", g.check_cached_equals_plain, device, p, k)
               for k in ("bert", "qwen2") for p in ("fp32", "bf16")]  # fmt: skip
    results += [
        run_check(f"pass_reps_equal_{kind}", g.check_pass_reps_equal, device, kind) for kind in ("bert", "qwen2")
    ]
    results.append(run_check("attention_kernels", g.check_attention_kernels, device))
    results.append(run_check("memory_flat", g.check_memory_flat, device, **memory))
    if device == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_throughput:
        results.append(run_check("throughput", throughput, device, args.cpu_dry_run, args.peak_tflops, args.timeout))
    report = {
        "bench": "gpu_check", "dry_run": args.cpu_dry_run, "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                     "transformers": transformers.__version__,
                     "sentence_transformers": sentence_transformers.__version__,
                     "flash_attn": g._has_flash()},
        "carried_wheels": wheels_dir is not None, "ok": all(r["ok"] for r in results), "checks": results,
        "total_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    line = json.dumps(report)
    if os.environ.get("OUT"):  # the device tool brings back what is written under $OUT
        Path(os.environ["OUT"], "gpu_check.json").write_text(line + "\n")
    print(line)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
