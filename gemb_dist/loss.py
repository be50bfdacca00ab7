"""The Gemini Embedding NCE loss with Matryoshka (MRL) prefixes, as a pure function of embeddings.

Each rank scores its own queries against the positives of the whole global batch (and its own hard
negatives), so the similarity matrix per rank is `B_local x B_global`. Nothing here talks to other
processes: the caller gathers the positives (`gemb_dist.distributed.all_gather_with_grad`) and passes
its `rank` so that the labels are offset to the rows this rank owns, or (scoring a block of its queries)
the `label_offset` of the block's first positive row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Squared-norm floor before the square root: keeps the gradient finite for an all-zero prefix
# (such rows only occur as absent hard negatives, whose logits are masked out anyway).
_MIN_SQUARED_NORM = 1e-24


@dataclass
class LossOutput:
    """The weighted MRL loss (differentiable) and per-MRL-dim metrics (plain floats, for logging)."""

    loss: torch.Tensor  # [] scalar
    per_dim_loss: dict[int, float]
    per_dim_accuracy: dict[int, float]


def contrastive_loss(
    q: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor | None = None,
    *,
    temperature: float,
    mrl_dims: Sequence[int],
    mrl_weights: Sequence[float] | None = None,
    q_keys: torch.Tensor | None = None,
    pos_keys: torch.Tensor | None = None,
    rank: int = 0,
    world_size: int = 1,
    neg_mask: torch.Tensor | None = None,
    label_offset: int | None = None,
) -> LossOutput:
    """NCE over cosine similarities / `temperature`, averaged over this rank's queries, for each MRL prefix.

    `q` [B_local, D]: this rank's queries. `pos` [B_global, D]: the positives of all ranks, rank `r`
    owning rows `r*B_local:(r+1)*B_local`. `neg` [B_local, K, D]: hard negatives, with `neg_mask`
    [B_local, K] (False = absent, its term dropped). `q_keys`/`pos_keys` [B_global] int64 hashes of the
    input texts: in-batch candidate `j != i` is masked out when its query or positive text equals
    query `i`'s (None = no duplicates). Each prefix `E[:, :d]` is re-normalised before the cosine.
    The total is `sum_d w_d L_d / sum_d w_d`; accuracy counts a query as right when its positive
    scores strictly above every unmasked in-batch candidate and every present hard negative.
    `label_offset` (instead of `rank`/`world_size`): query `i`'s positive is row `label_offset + i` of
    `pos`, which may hold any number of rows (a block of a rank's queries against the global batch).
    """
    dims, weights = _check_inputs(
        q, pos, neg, temperature, mrl_dims, mrl_weights, q_keys, pos_keys, rank, world_size, neg_mask, label_offset
    )
    num_local = q.shape[0]
    offset = rank * num_local if label_offset is None else label_offset
    labels_B = torch.arange(num_local, device=q.device) + offset  # the rows of `pos` these queries own

    cos_MBG, cos_neg_MBK = _prefix_cosines(q, pos, neg, dims)
    logits_MBG = cos_MBG / temperature
    pos_logit_MB = logits_MBG[:, torch.arange(num_local, device=q.device), labels_B]

    # Candidates that must not count as negatives: duplicates of the row's own query or positive text.
    # The positive itself is never masked, so every logsumexp below has at least one finite term.
    blocked_BG = _duplicate_mask(q_keys, pos_keys, labels_B, pos.shape[0], q.device)
    logits_MBG = logits_MBG.masked_fill(blocked_BG, float("-inf"))
    candidates = [logits_MBG]
    if cos_neg_MBK is not None:
        logits_neg_MBK = cos_neg_MBK / temperature
        if neg_mask is not None:
            logits_neg_MBK = logits_neg_MBK.masked_fill(~neg_mask.to(q.device), float("-inf"))
        candidates.append(logits_neg_MBK)
    all_logits_MBC = torch.cat(candidates, dim=2)

    loss_MB = torch.logsumexp(all_logits_MBC, dim=2) - pos_logit_MB
    loss_M = loss_MB.mean(dim=1)
    weights_M = torch.tensor(weights, dtype=loss_M.dtype, device=loss_M.device)
    total = (loss_M * weights_M).sum() / weights_M.sum()

    with torch.no_grad():
        # The positive competes with everything but itself (and the masked candidates, already -inf).
        others_MBC = all_logits_MBC.clone()
        others_MBC[:, torch.arange(num_local, device=q.device), labels_B] = float("-inf")
        correct_MB = pos_logit_MB > others_MBC.amax(dim=2)
        accuracy_M = correct_MB.to(loss_M.dtype).mean(dim=1)
        per_dim = torch.stack([loss_M.detach(), accuracy_M]).tolist()  # one device sync for all metrics
    return LossOutput(
        loss=total,
        per_dim_loss=dict(zip(dims, per_dim[0], strict=True)),
        per_dim_accuracy=dict(zip(dims, per_dim[1], strict=True)),
    )


def _prefix_cosines(
    q_BD: torch.Tensor, pos_GD: torch.Tensor, neg_BKD: torch.Tensor | None, dims: list[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cosine similarities of every re-normalised prefix, `[M, B, G]` and `[M, B, K]` (M = len(dims)).

    Dot products and squared norms of nested prefixes are cumulative sums over the column blocks
    between consecutive MRL dims, so all prefixes together cost one full-width matmul.
    """
    order = sorted(range(len(dims)), key=lambda m: dims[m])
    bounds = [0] + [dims[m] for m in order]
    dot_BG = q_BD.new_zeros(q_BD.shape[0], pos_GD.shape[0])
    q_sq_B = q_BD.new_zeros(q_BD.shape[0])
    pos_sq_G = q_BD.new_zeros(pos_GD.shape[0])
    has_neg = neg_BKD is not None and neg_BKD.shape[1] > 0
    if has_neg:
        dot_neg_BK = q_BD.new_zeros(neg_BKD.shape[:2])
        neg_sq_BK = q_BD.new_zeros(neg_BKD.shape[:2])
    cos_by_dim: dict[int, torch.Tensor] = {}
    cos_neg_by_dim: dict[int, torch.Tensor] = {}
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        q_blk, pos_blk = q_BD[:, lo:hi], pos_GD[:, lo:hi]
        dot_BG = dot_BG + q_blk @ pos_blk.T
        q_sq_B = q_sq_B + q_blk.square().sum(dim=1)
        pos_sq_G = pos_sq_G + pos_blk.square().sum(dim=1)
        q_norm_B = q_sq_B.clamp_min(_MIN_SQUARED_NORM).sqrt()
        cos_by_dim[hi] = dot_BG / (q_norm_B[:, None] * pos_sq_G.clamp_min(_MIN_SQUARED_NORM).sqrt()[None, :])
        if has_neg:
            neg_blk = neg_BKD[:, :, lo:hi]
            dot_neg_BK = dot_neg_BK + torch.einsum("bd,bkd->bk", q_blk, neg_blk)
            neg_sq_BK = neg_sq_BK + neg_blk.square().sum(dim=2)
            cos_neg_by_dim[hi] = dot_neg_BK / (q_norm_B[:, None] * neg_sq_BK.clamp_min(_MIN_SQUARED_NORM).sqrt())
    cos_MBG = torch.stack([cos_by_dim[d] for d in dims])
    cos_neg_MBK = torch.stack([cos_neg_by_dim[d] for d in dims]) if has_neg else None
    return cos_MBG, cos_neg_MBK


def _duplicate_mask(
    q_keys: torch.Tensor | None, pos_keys: torch.Tensor | None, labels_B: torch.Tensor, num_global: int, device
) -> torch.Tensor:
    """[B, G] True where candidate j is not the row's positive but shares its query or positive text."""
    blocked_BG = torch.zeros(labels_B.shape[0], num_global, dtype=torch.bool, device=device)
    for keys in (q_keys, pos_keys):
        if keys is not None:
            keys = keys.to(device)
            blocked_BG |= keys[labels_B][:, None] == keys[None, :]
    blocked_BG[torch.arange(labels_B.shape[0], device=device), labels_B] = False
    return blocked_BG


def _check_inputs(
    q, pos, neg, temperature, mrl_dims, mrl_weights, q_keys, pos_keys, rank, world_size, neg_mask, label_offset=None
):
    """Reject inputs that would give a wrong or NaN loss; returns (dims, weights) as plain lists."""
    if not isinstance(q, torch.Tensor) or q.dim() != 2:
        raise ValueError(f"contrastive_loss: q must be a [B_local, D] tensor, got {_shape(q)}")
    num_local, width = q.shape
    if num_local == 0 or width == 0:
        raise ValueError(f"contrastive_loss: empty batch, q has shape {tuple(q.shape)}")
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[1] != width:
        raise ValueError(f"contrastive_loss: pos must be [B_global, {width}] like q's width, got {_shape(pos)}")
    if label_offset is not None:
        if (rank, world_size) != (0, 1):
            raise ValueError("contrastive_loss: pass either label_offset or rank/world_size, not both")
        if not isinstance(label_offset, int) or not 0 <= label_offset <= pos.shape[0] - num_local:
            raise ValueError(
                f"contrastive_loss: label_offset must be in [0, {pos.shape[0] - num_local}] so that the {num_local} "
                f"queries' positives are rows of pos ({pos.shape[0]} rows), got {label_offset!r}"
            )
    elif not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"contrastive_loss: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    elif pos.shape[0] != world_size * num_local:
        raise ValueError(
            f"contrastive_loss: pos has {pos.shape[0]} rows but world_size * B_local = {world_size} * {num_local} "
            f"= {world_size * num_local}; every rank must contribute the same number of queries"
        )
    if neg is not None and (
        not isinstance(neg, torch.Tensor) or neg.dim() != 3 or neg.shape[0] != num_local or neg.shape[2] != width
    ):
        raise ValueError(f"contrastive_loss: neg must be [{num_local}, K, {width}], got {_shape(neg)}")
    if neg_mask is not None:
        if neg is None:
            raise ValueError("contrastive_loss: neg_mask given without neg")
        if neg_mask.shape != neg.shape[:2] or neg_mask.dtype != torch.bool:
            raise ValueError(
                f"contrastive_loss: neg_mask must be a bool [{num_local}, {neg.shape[1]}] tensor, "
                f"got {neg_mask.dtype} {tuple(neg_mask.shape)}"
            )
    for name, keys in (("q_keys", q_keys), ("pos_keys", pos_keys)):
        if keys is not None and (keys.shape != (pos.shape[0],) or keys.dtype.is_floating_point):
            raise ValueError(
                f"contrastive_loss: {name} must be an integer [{pos.shape[0]}] tensor (one hash per global row), "
                f"got {keys.dtype} {tuple(keys.shape)}"
            )
    if not isinstance(temperature, int | float) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"contrastive_loss: temperature must be a finite number > 0, got {temperature!r}")
    dims = [int(d) for d in mrl_dims]
    if not dims or any(d <= 0 or d > width for d in dims) or len(set(dims)) != len(dims):
        raise ValueError(
            f"contrastive_loss: mrl_dims must be distinct integers in [1, D={width}], got {list(mrl_dims)}"
        )
    weights = [1.0] * len(dims) if mrl_weights is None else [float(w) for w in mrl_weights]
    if len(weights) != len(dims):
        raise ValueError(f"contrastive_loss: mrl_weights has {len(weights)} entries for {len(dims)} mrl_dims {dims}")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"contrastive_loss: mrl_weights must be finite, >= 0, with a positive sum, got {weights}")
    for name, tensor in (("q", q), ("pos", pos), ("neg", neg)):
        if tensor is not None and not torch.isfinite(tensor).all():
            raise ValueError(f"contrastive_loss: {name} contains NaN or Inf embeddings")
    return dims, weights


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
