"""contrastive_loss against a naive per-example loop written here, plus every bad-input error."""

from __future__ import annotations

import math

import pytest
import torch

from gemb_dist.loss import contrastive_loss


def naive_loss(q, pos, neg, *, temperature, mrl_dims, mrl_weights, q_keys, pos_keys, rank, neg_mask):
    """The paper's formula one query, one candidate at a time; returns (loss tensor, losses, accuracies)."""
    num_local = q.shape[0]
    per_dim_losses, per_dim_acc = [], []
    for d in mrl_dims:
        losses, correct = [], 0
        for i in range(num_local):
            g = rank * num_local + i
            qi = q[i, :d] / q[i, :d].norm()

            def score(doc, qi=qi, d=d):
                return torch.dot(qi, doc[:d] / doc[:d].norm()) / temperature

            positive = score(pos[g])
            others = []
            for j in range(pos.shape[0]):
                duplicate = (q_keys is not None and q_keys[j] == q_keys[g]) or (
                    pos_keys is not None and pos_keys[j] == pos_keys[g]
                )
                if j != g and not duplicate:
                    others.append(score(pos[j]))
            if neg is not None:
                for k in range(neg.shape[1]):
                    if neg_mask is None or neg_mask[i, k]:
                        others.append(score(neg[i, k]))
            denominator = torch.exp(positive) + sum(torch.exp(s) for s in others)
            losses.append(-(positive - torch.log(denominator)))
            correct += int(all(positive.item() > s.item() for s in others))
        per_dim_losses.append(sum(losses) / num_local)
        per_dim_acc.append(correct / num_local)
    weights = mrl_weights or [1.0] * len(mrl_dims)
    total = sum(w * loss for w, loss in zip(weights, per_dim_losses, strict=True)) / sum(weights)
    return total, [x.item() for x in per_dim_losses], per_dim_acc


def make_inputs(num_local=4, world_size=3, num_neg=3, width=16, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_global = num_local * world_size
    q = torch.randn(num_local, width, generator=gen, dtype=dtype)
    pos = torch.randn(num_global, width, generator=gen, dtype=dtype)
    pos += 0.8 * q.repeat(world_size, 1)  # every rank's own rows partly easy: accuracy neither 0 nor 1
    neg = torch.randn(num_local, num_neg, width, generator=gen, dtype=dtype)
    neg_mask = torch.rand(num_local, num_neg, generator=gen) > 0.4
    neg_mask[0] = False  # a query with no hard negative at all
    neg_mask[1] = True
    q_keys = torch.arange(num_global, dtype=torch.int64) * 7919
    pos_keys = torch.arange(num_global, dtype=torch.int64) * 104729
    q_keys[5 % num_global] = q_keys[1]  # duplicate queries across ranks (rank 1 owns row 5 when B_local=4)
    pos_keys[10 % num_global] = pos_keys[6 % num_global]  # duplicate positives outside rank 0's rows
    pos_keys[2] = pos_keys[9 % num_global]
    return q, pos, neg, neg_mask, q_keys, pos_keys


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_matches_naive_loop_with_duplicates_negatives_mrl_and_rank_offsets(rank):
    q, pos, neg, neg_mask, q_keys, pos_keys = make_inputs()
    # Re-label so that this rank's queries are the ones involved in the duplicates.
    q_keys[rank * 4 + 1] = q_keys[(rank * 4 + 5) % 12]
    pos_keys[rank * 4 + 2] = pos_keys[(rank * 4 + 7) % 12]
    kwargs = dict(temperature=0.07, mrl_dims=[4, 8, 16], mrl_weights=[1.0, 0.5, 2.0], q_keys=q_keys, pos_keys=pos_keys)
    inputs = [t.clone().requires_grad_() for t in (q, pos, neg)]
    out = contrastive_loss(*inputs, rank=rank, world_size=3, neg_mask=neg_mask, **kwargs)
    out.loss.backward()

    ref_inputs = [t.clone().requires_grad_() for t in (q, pos, neg)]
    ref_loss, ref_per_dim, ref_acc = naive_loss(*ref_inputs, rank=rank, neg_mask=neg_mask, **kwargs)
    ref_loss.backward()

    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-10, atol=1e-12)
    for got, want in zip(inputs, ref_inputs, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-12)
    assert list(out.per_dim_loss) == [4, 8, 16]
    assert list(out.per_dim_loss.values()) == pytest.approx(ref_per_dim, rel=1e-10)
    assert list(out.per_dim_accuracy.values()) == ref_acc
    assert any(0 < a < 1 for a in ref_acc), "inputs should make accuracy informative"


def test_duplicate_mask_and_hard_negatives_change_the_loss():
    q, pos, neg, neg_mask, q_keys, pos_keys = make_inputs(world_size=1)
    kwargs = dict(temperature=0.05, mrl_dims=[16])
    plain = contrastive_loss(q, pos, **kwargs).loss
    dup = pos_keys.clone()
    dup[1] = dup[0]
    masked = contrastive_loss(q, pos, pos_keys=dup, **kwargs).loss
    with_neg = contrastive_loss(q, pos, neg, neg_mask=neg_mask, **kwargs).loss
    all_absent = contrastive_loss(q, pos, neg, neg_mask=torch.zeros_like(neg_mask), **kwargs).loss
    assert masked < plain  # fewer negatives in the denominator
    assert with_neg > plain
    torch.testing.assert_close(all_absent, plain)


def test_float32_and_default_weights_match_naive():
    q, pos, neg, neg_mask, q_keys, pos_keys = make_inputs(world_size=2, dtype=torch.float32, seed=3)
    out = contrastive_loss(q, pos, neg, temperature=0.02, mrl_dims=[16, 8], rank=1, world_size=2)
    ref, ref_per_dim, _ = naive_loss(
        q.double(),
        pos.double(),
        neg.double(),
        temperature=0.02,
        mrl_dims=[16, 8],
        mrl_weights=None,
        q_keys=None,
        pos_keys=None,
        rank=1,
        neg_mask=None,
    )
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert list(out.per_dim_loss) == [16, 8]
    assert list(out.per_dim_loss.values()) == pytest.approx(ref_per_dim, rel=1e-5)


def test_perfect_embeddings_have_full_accuracy_and_low_loss():
    q = torch.eye(6, 8)
    out = contrastive_loss(q, q.clone(), temperature=0.01, mrl_dims=[8])
    assert out.per_dim_accuracy[8] == 1.0
    assert out.per_dim_loss[8] < 1e-6


def test_extreme_logits_stay_finite():
    q = torch.randn(4, 8)
    out = contrastive_loss(q, q.clone(), temperature=1e-4, mrl_dims=[2, 8])
    assert math.isfinite(out.loss.item())


def _bad_cases():
    q, pos, neg, neg_mask, q_keys, pos_keys = make_inputs(num_local=2, world_size=2, num_neg=2, width=8)
    base = dict(q=q, pos=pos, neg=neg, temperature=0.05, mrl_dims=[4, 8], world_size=2, rank=0)
    nan_q = q.clone()
    nan_q[0, 0] = float("nan")
    inf_neg = neg.clone()
    inf_neg[1, 0, 3] = float("inf")
    return {
        "q must be a \\[B_local, D\\]": dict(q=q[0]),
        "empty batch": dict(q=q[:0], pos=pos[:0]),
        "pos must be \\[B_global, 8\\]": dict(pos=pos[:, :6]),
        "every rank must contribute": dict(pos=pos[:3]),
        "rank < world_size": dict(rank=2),
        "neg must be": dict(neg=neg[:1]),
        "neg must be ": dict(neg=neg[..., :4]),
        "neg_mask given without neg": dict(neg=None, neg_mask=neg_mask),
        "neg_mask must be a bool": dict(neg_mask=neg_mask.long()),
        "neg_mask must be a bool ": dict(neg_mask=neg_mask[:, :1]),
        "q_keys must be an integer": dict(q_keys=q_keys[:3]),
        "pos_keys must be an integer": dict(pos_keys=pos_keys.double()),
        "temperature must be": dict(temperature=0.0),
        "temperature must be ": dict(temperature=-1.0),
        "temperature must be  ": dict(temperature=float("nan")),
        "mrl_dims must be distinct": dict(mrl_dims=[4, 16]),
        "mrl_dims must be distinct ": dict(mrl_dims=[]),
        "mrl_dims must be distinct  ": dict(mrl_dims=[0, 8]),
        "mrl_dims must be distinct   ": dict(mrl_dims=[8, 8]),
        "mrl_weights has 1 entries": dict(mrl_weights=[1.0]),
        "mrl_weights must be finite": dict(mrl_weights=[0.0, 0.0]),
        "mrl_weights must be finite ": dict(mrl_weights=[-1.0, 2.0]),
        "q contains NaN": dict(q=nan_q),
        "neg contains NaN or Inf": dict(neg=inf_neg),
    }, base


@pytest.mark.parametrize("message", list(_bad_cases()[0]))
def test_bad_input_raises_value_error(message):
    cases, base = _bad_cases()
    kwargs = {**base, **cases[message]}
    with pytest.raises(ValueError, match=message.strip()):
        contrastive_loss(kwargs.pop("q"), kwargs.pop("pos"), kwargs.pop("neg"), **kwargs)


def test_label_offset_scores_blocks_of_queries_like_the_rows_of_the_whole_batch():
    # Rank 1 of 3 holds 4 queries (global rows 4-7); uneven blocks [0], [1, 2], [3] carry explicit label offsets.
    q, pos, neg, neg_mask, q_keys, pos_keys = make_inputs()
    kwargs = dict(temperature=0.07, mrl_dims=[8, 16], mrl_weights=[1.0, 2.0], q_keys=q_keys, pos_keys=pos_keys)
    total = 0.0
    for start, stop in ((0, 1), (1, 3), (3, 4)):
        rows = slice(start, stop)
        out = contrastive_loss(q[rows], pos, neg[rows], neg_mask=neg_mask[rows], label_offset=4 + start, **kwargs)
        total += out.loss.item() * (stop - start) / 4
    ref, _, _ = naive_loss(q, pos, neg, rank=1, neg_mask=neg_mask, **kwargs)
    assert total == pytest.approx(ref.item(), rel=1e-10)
    with pytest.raises(ValueError, match="label_offset"):
        contrastive_loss(q[:2], pos, label_offset=11, **kwargs)  # rows 11-12, but pos has 12 rows
    with pytest.raises(ValueError, match="either label_offset or rank"):
        contrastive_loss(q[:2], pos, label_offset=0, rank=1, world_size=3, **kwargs)
