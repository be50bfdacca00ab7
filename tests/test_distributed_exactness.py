"""Real gloo processes (world sizes 2 and 4) against one process computing the whole global batch at once.

Loss, per-dim metrics and every parameter gradient (averaged over ranks, as DDP/DeepSpeed do) must match
the single-process reference to 1e-5 relative, with duplicate texts and hard negatives in the batch,
for the cached step (small chunks) and the plain step. Every rank must also run the same number of
forward passes (ZeRO-3 gathers parameters in each), even when ranks hold different numbers of present
hard negatives.
"""

from __future__ import annotations

import pytest
import torch
from _models import tiny_bert
from _mp import run_workers

from gemb_dist import distributed
from gemb_dist.batch import TextBatch, TrainBatch, text_key
from gemb_dist.gradcache import GradCache
from gemb_dist.loss import contrastive_loss
from gemb_dist.model import EmbeddingModel

GLOBAL_BATCH = 8
NUM_NEG = 2
VOCAB = 500
MRL_DIMS = [8, 16]
LOSS = dict(temperature=0.05, mrl_dims=MRL_DIMS, mrl_weights=[1.0, 2.0])


def build_model() -> EmbeddingModel:
    return tiny_bert(1234, MRL_DIMS, vocab_size=VOCAB)


def _side(rows: list[list[int]]) -> tuple[TextBatch, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    keys = torch.tensor([text_key(" ".join(map(str, r))) for r in rows], dtype=torch.int64)
    return TextBatch(ids, mask), keys


def global_batch() -> TrainBatch:
    gen = torch.Generator().manual_seed(7)

    def text() -> list[int]:
        return torch.randint(3, VOCAB, (int(torch.randint(2, 12, (1,), generator=gen)),), generator=gen).tolist()

    queries = [text() for _ in range(GLOBAL_BATCH)]
    positives = [text() for _ in range(GLOBAL_BATCH)]
    queries[5] = queries[0]  # duplicate query on another rank (world size 2 and 4)
    positives[3] = positives[6]  # duplicate positive across ranks
    positives[1] = positives[0]  # duplicate positive on the same rank
    negatives = [text() for _ in range(GLOBAL_BATCH * NUM_NEG)]
    query, q_keys = _side(queries)
    positive, p_keys = _side(positives)
    neg, _ = _side(negatives)
    neg_mask = torch.ones(GLOBAL_BATCH, NUM_NEG, dtype=torch.bool)
    neg_mask[2, 1] = neg_mask[4] = neg_mask[7, 0] = False
    return TrainBatch(query, positive, q_keys, p_keys, negatives=neg, negatives_mask=neg_mask)


def local_slice(batch: TrainBatch, rank: int, world_size: int) -> TrainBatch:
    b = len(batch) // world_size
    rows = slice(rank * b, (rank + 1) * b)
    neg_rows = slice(rank * b * NUM_NEG, (rank + 1) * b * NUM_NEG)

    def cut(side: TextBatch, r: slice) -> TextBatch:
        return TextBatch(side.input_ids[r], side.attention_mask[r])

    return TrainBatch(
        cut(batch.query, rows),
        cut(batch.positive, rows),
        batch.query_keys[rows],
        batch.positive_keys[rows],
        negatives=cut(batch.negatives, neg_rows),
        negatives_mask=batch.negatives_mask[rows],
    )


def rank_step(rank: int, world_size: int) -> dict:
    """One step per mode on this rank's slice; gradients averaged over ranks like DDP/DeepSpeed."""
    assert distributed.get_rank() == rank and distributed.get_world_size() == world_size
    model = build_model()
    batch = global_batch()
    local = local_slice(batch, rank, world_size)
    gathered_keys = distributed.all_gather_no_grad(local.query_keys)
    results = {"keys_ok": bool(torch.equal(gathered_keys, batch.query_keys))}
    encode_calls = []

    def counting_encode(texts: TextBatch) -> torch.Tensor:
        encode_calls.append(len(texts))
        return model.encode_batch(texts)

    for mode, chunk_size in (("cached", 3), ("plain", 1000)):
        model.zero_grad(set_to_none=True)
        encode_calls.clear()
        # Loss blocks of 3 queries (uneven: 3 + 1 with 4 per rank): block label offsets compose with rank offsets.
        cache = GradCache(counting_encode, chunk_size=chunk_size, loss_block_size=3, **LOSS)
        out = cache.cached_step(local) if mode == "cached" else cache.plain_step(local)
        results[mode] = {
            "encode_calls": len(encode_calls),
            "loss": distributed.all_reduce_mean(out.loss.loss).item(),
            "per_dim_loss": {
                d: distributed.all_reduce_mean(torch.tensor(v)).item() for d, v in out.loss.per_dim_loss.items()
            },
            "per_dim_accuracy": {
                d: distributed.all_reduce_mean(torch.tensor(v)).item() for d, v in out.loss.per_dim_accuracy.items()
            },
            "grads": {
                n: distributed.all_reduce_mean(p.grad) for n, p in model.named_parameters() if p.grad is not None
            },
        }
    distributed.barrier()
    return results


def reference() -> dict:
    """One process, the whole global batch at once, each side at its full padded width."""
    model = build_model()
    batch = global_batch()
    q = model.encode_batch(batch.query)
    pos = model.encode_batch(batch.positive)
    neg = model.encode_batch(batch.negatives).reshape(GLOBAL_BATCH, NUM_NEG, -1)
    out = contrastive_loss(
        q, pos, neg, q_keys=batch.query_keys, pos_keys=batch.positive_keys, neg_mask=batch.negatives_mask, **LOSS
    )
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {
        "loss": out.loss.item(),
        "per_dim_loss": out.per_dim_loss,
        "per_dim_accuracy": out.per_dim_accuracy,
        "grads": grads,
    }


def assert_matches(got: dict, want: dict, label: str) -> None:
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), label
    assert got["per_dim_loss"] == pytest.approx(want["per_dim_loss"], rel=1e-5), label
    assert got["per_dim_accuracy"] == pytest.approx(want["per_dim_accuracy"], abs=1e-9), label
    assert set(got["grads"]) == set(want["grads"]), label
    total_norm = torch.stack([g.norm() for g in want["grads"].values()]).norm()
    for name, ref in want["grads"].items():
        # Some gradients are zero in exact arithmetic (e.g. attention key biases: softmax ignores a shift),
        # so their float noise is judged against a small fraction of the whole gradient instead.
        err = (got["grads"][name] - ref).norm() / torch.maximum(ref.norm(), 1e-4 * total_norm)
        assert err <= 1e-5, f"{label}: gradient of {name} off by {err:.2e} relative"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_multi_process_loss_and_gradients_equal_single_process_global_batch():
    torch.set_num_threads(1)
    want = reference()
    assert len(want["grads"]) > 10 and all(g.norm() > 0 for g in want["grads"].values())
    for world_size in (2, 4):
        results = run_workers(rank_step, world_size)
        for mode in ("cached", "plain"):
            calls = [got[mode]["encode_calls"] for got in results]
            assert len(set(calls)) == 1, f"world {world_size} {mode}: forward passes per rank differ: {calls}"
        for rank, got in enumerate(results):
            assert got["keys_ok"], f"world {world_size} rank {rank}: all_gather_no_grad out of rank order"
            for mode in ("cached", "plain"):
                assert_matches(got[mode], want, f"world {world_size} rank {rank} {mode}")
