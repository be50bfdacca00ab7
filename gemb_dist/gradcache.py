"""Gradient caching: a global batch of any size with activation memory set by the chunk, not the batch.

One step, engine-agnostic (the model's forward and the backward call are injected):
  1. pack every text of the local batch (queries, positives, present hard negatives) into chunks of
     similar length, and encode each chunk without grad, saving the RNG state it started from;
  2. all-gather the positives and the text keys, compute the loss on the reps (a leaf tensor) and the
     gradient of the loss with respect to every rep;
  3. re-encode each chunk with grad from its saved RNG state (so dropout draws the same masks) and
     back-propagate `sum(reps * cached_grad)`, whose parameter gradient is the chunk's share of the
     full gradient.
Order inside the batch does not matter to the loss, so texts are sorted by length before packing,
which cuts padding; each chunk is trimmed to its own longest text.

Gradient scale: each rank's loss is the mean over its own B_local queries, and the backward of
`all_gather_with_grad` sums the gradients all ranks computed for a rank's positives. The parameter
gradient on rank r is therefore d(sum_r' L_r')/d(theta_r); averaging it over W ranks (what DDP and
DeepSpeed do) gives d(mean_r L_r)/d(theta) = the gradient of the single-process loss averaged over all
W*B_local queries of the global batch. No extra scaling is needed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gemb_dist.batch import TextBatch, TrainBatch
from gemb_dist.chunking import Chunk, _flat_sources, _match_chunk_count, plan_chunks
from gemb_dist.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    get_rank,
    get_world_size,
    raise_if_any_rank,
)
from gemb_dist.loss import LossOutput, contrastive_loss

EncodeFn = Callable[[TextBatch], torch.Tensor]  # TextBatch [N, L] -> reps [N, D]
BackwardFn = Callable[[torch.Tensor, bool], Any]  # (loss, last backward of the step?)
ContextFactory = Callable[[], contextlib.AbstractContextManager]


@dataclass
class StepOutput:
    """The loss of one step plus where its time went and how many tokens one encoding pass processed."""

    loss: LossOutput
    encode_seconds: float  # pass 1 (cached) or the grad-enabled forward (plain)
    loss_seconds: float  # gathers, loss and its gradient with respect to the reps
    backward_seconds: float  # pass 2 re-encode + backward (cached) or the single backward (plain)
    num_real_tokens: int
    num_padded_tokens: int
    num_chunks: int


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _now() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # time the work, not the kernel launches
    return time.perf_counter()


class GradCache:
    """One training step's forward and backward over a `TrainBatch`, with or without the gradient cache.

    `encode` is the model's forward (`TextBatch -> reps [N, D]`), `backward(loss, last)` is called on
    every loss that must be back-propagated, `last` True for the step's final one (DeepSpeed:
    `engine.backward`, `last` marking the accumulation boundary), `backward_context` (optional) wraps
    all of pass 2's backward calls (DeepSpeed: `engine.coalesce_grad_reduction`) and `pass1_context`
    (optional) all of pass 1's no-grad encodes (ZeRO-3: one parameter gather for every chunk). Parameter
    gradients are accumulated, never zeroed here; the optimizer step is the caller's. The loss and the
    cached rep gradients are fp32 whatever the model's dtype. A non-finite rep, loss or rep gradient
    on any rank raises `NonFiniteError` on every rank (all ranks must call `step` together).
    """

    def __init__(
        self,
        encode: EncodeFn,
        *,
        temperature: float,
        mrl_dims: list[int],
        mrl_weights: list[float] | None = None,
        mask_duplicates: bool = True,
        chunk_size: int = 32,
        chunk_tokens: int | None = None,
        loss_block_size: int = 256,
        enabled: bool = True,
        backward: BackwardFn | None = None,
        backward_context: ContextFactory | None = None,
        pass1_context: ContextFactory | None = None,
    ) -> None:
        if chunk_size <= 0 or (chunk_tokens is not None and chunk_tokens <= 0) or loss_block_size <= 0:
            raise ValueError(
                f"gradcache: chunk_size, chunk_tokens and loss_block_size must be > 0, got {chunk_size}, "
                f"{chunk_tokens}, {loss_block_size}"
            )
        self.encode = encode
        self.loss_block_size = loss_block_size
        self.loss_kwargs = dict(temperature=temperature, mrl_dims=list(mrl_dims), mrl_weights=mrl_weights)
        self.mask_duplicates = mask_duplicates
        self.chunk_size, self.chunk_tokens, self.enabled = chunk_size, chunk_tokens, enabled
        self.backward = backward or _plain_backward
        self.backward_context = backward_context or contextlib.nullcontext
        self.pass1_context = pass1_context or contextlib.nullcontext

    @classmethod
    def from_config(cls, config, encode: EncodeFn, **kwargs) -> GradCache:
        """Build from a `GembConfig` (sections `loss`, `gradcache`, `model.mrl_dims`); kwargs as in __init__."""
        return cls(
            encode,
            temperature=config.loss.temperature,
            mrl_dims=config.model.mrl_dims,
            mrl_weights=config.loss.mrl_weights,
            mask_duplicates=config.loss.mask_duplicates,
            chunk_size=config.gradcache.chunk_size,
            chunk_tokens=config.gradcache.chunk_tokens,
            loss_block_size=config.gradcache.loss_block_size,
            enabled=config.gradcache.enabled,
            **kwargs,
        )

    def step(self, batch: TrainBatch) -> StepOutput:
        """The cached step when the cache is enabled, else the plain one."""
        return self.cached_step(batch) if self.enabled else self.plain_step(batch)

    def cached_step(self, batch: TrainBatch) -> StepOutput:
        """Two-pass step (see the module docstring); activation memory is that of one chunk."""
        _check_batch(batch)
        chunks = _match_chunk_count(plan_chunks(batch, self.chunk_size, self.chunk_tokens))
        start = _now()
        states, chunk_reps = [], []
        with torch.no_grad(), self.pass1_context():
            for chunk in chunks:
                states.append(_rng_state())
                chunk_reps.append(self.encode(chunk.texts))
        state_after_pass1 = _rng_state()
        reps_ND = self._scatter(batch, chunks, chunk_reps)
        raise_if_any_rank(not bool(torch.isfinite(reps_ND).all()), "reps (pass 1 encode)")
        encoded = _now()

        out, grad_ND = self._blockwise_loss_and_grad(batch, reps_ND)
        raise_if_any_rank(not bool(torch.isfinite(out.loss) and torch.isfinite(grad_ND).all()), "loss or rep gradient")
        scored = _now()

        with self.backward_context():
            for i, (chunk, state) in enumerate(zip(chunks, states, strict=True)):
                _set_rng_state(state)
                reps = self.encode(chunk.texts)
                if chunk.is_filler:
                    grad = torch.zeros_like(reps, dtype=grad_ND.dtype)
                else:
                    grad = grad_ND[chunk.rows.to(grad_ND.device)]
                # fp32 product: the cached gradient is cast to the model's dtype only inside the encoder's backward.
                self.backward((reps.to(grad.dtype) * grad).sum(), i == len(chunks) - 1)
        _set_rng_state(state_after_pass1)  # later steps draw fresh randomness, as without the cache
        return self._output(out, chunks, start, encoded, scored, _now())

    def plain_step(self, batch: TrainBatch) -> StepOutput:
        """No cache: encode every chunk with grad, keep all graphs, one backward (memory grows with the batch)."""
        _check_batch(batch)
        chunks = _match_chunk_count(plan_chunks(batch, self.chunk_size, self.chunk_tokens))
        start = _now()
        chunk_reps = [self.encode(chunk.texts) for chunk in chunks]
        reps_ND = self._scatter(batch, chunks, chunk_reps)
        raise_if_any_rank(not bool(torch.isfinite(reps_ND).all()), "reps (encode)")
        encoded = _now()
        out = self._loss(batch, reps_ND)
        raise_if_any_rank(not bool(torch.isfinite(out.loss)), "loss")
        scored = _now()
        # Fillers join the graph with weight 0 so their backward runs (and gathers) on this rank too.
        fillers = [r.sum() * 0.0 for c, r in zip(chunks, chunk_reps, strict=True) if c.is_filler]
        self.backward(out.loss + sum(fillers) if fillers else out.loss, True)
        out.loss = out.loss.detach()
        return self._output(out, chunks, start, encoded, scored, _now())

    def _scatter(self, batch: TrainBatch, chunks: list[Chunk], chunk_reps: list[torch.Tensor]) -> torch.Tensor:
        """[N, D] reps in flat order; absent hard negatives stay zero (their logits are masked out)."""
        kept = [(c, r) for c, r in zip(chunks, chunk_reps, strict=True) if not c.is_filler]
        reps_nD = torch.cat([r for _, r in kept])
        reps_nD = reps_nD.to(torch.promote_types(reps_nD.dtype, torch.float32))  # the loss runs in >= fp32
        rows = torch.cat([c.rows for c, _ in kept]).to(reps_nD.device)
        num_texts = sum(len(s) for s in _flat_sources(batch))
        return reps_nD.new_zeros(num_texts, reps_nD.shape[1]).index_copy(0, rows, reps_nD)

    def _blockwise_loss_and_grad(self, batch: TrainBatch, reps_ND: torch.Tensor) -> tuple[LossOutput, torch.Tensor]:
        """The loss and d loss / d reps, scoring `loss_block_size` queries at a time.

        Each block's similarity matrix is `[block, B_global]`, so memory does not grow with B_local^2.
        A block of b queries starting at local row s owns the positives from global row rank*B_local + s
        (its explicit label offset); block losses are weighted by b / B_local (the last block may be shorter).
        """
        num_local, num_neg = len(batch), batch.num_negatives
        block = min(num_local, self.loss_block_size)
        rank = get_rank()
        q_BD = reps_ND[:num_local].clone().requires_grad_()
        pos_BD = reps_ND[num_local : 2 * num_local].clone().requires_grad_()
        neg_BKD = reps_ND[2 * num_local :].reshape(num_local, num_neg, -1).clone().requires_grad_() if num_neg else None
        pos_GD = all_gather_with_grad(pos_BD)
        pos_leaf_GD = pos_GD.detach().requires_grad_()  # block grads accumulate here; one gather backward at the end
        keys = self._gathered_keys(batch)
        num_global = pos_GD.shape[0]
        if num_global != get_world_size() * num_local:
            raise ValueError(
                f"gradcache: gathered {num_global} positives from {get_world_size()} ranks with {num_local} queries "
                "here; every rank must hold the same number of queries"
            )
        total, per_dim_loss, per_dim_acc = 0.0, {}, {}
        for start in range(0, num_local, block):
            rows = slice(start, min(start + block, num_local))
            out = contrastive_loss(
                q_BD[rows],
                pos_leaf_GD,
                neg_BKD[rows] if num_neg else None,
                q_keys=keys[0],
                pos_keys=keys[1],
                label_offset=rank * num_local + start,
                neg_mask=batch.negatives_mask[rows] if num_neg and batch.negatives_mask is not None else None,
                **self.loss_kwargs,
            )
            share = (rows.stop - rows.start) / num_local
            (out.loss * share).backward()
            total += out.loss.item() * share
            for d in out.per_dim_loss:
                per_dim_loss[d] = per_dim_loss.get(d, 0.0) + out.per_dim_loss[d] * share
                per_dim_acc[d] = per_dim_acc.get(d, 0.0) + out.per_dim_accuracy[d] * share
        if pos_GD is pos_BD:  # one process: the gather is the identity
            grad_pos_BD = pos_leaf_GD.grad
        else:
            (grad_pos_BD,) = torch.autograd.grad(pos_GD, pos_BD, grad_outputs=pos_leaf_GD.grad)
        grads = [q_BD.grad, grad_pos_BD] + ([neg_BKD.grad.reshape(-1, neg_BKD.shape[2])] if num_neg else [])
        loss = torch.tensor(total, dtype=reps_ND.dtype, device=reps_ND.device)
        return LossOutput(loss, per_dim_loss, per_dim_acc), torch.cat(grads)

    def _gathered_keys(self, batch: TrainBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.mask_duplicates:
            return None, None
        return all_gather_no_grad(batch.query_keys), all_gather_no_grad(batch.positive_keys)  # each back on CPU

    def _loss(self, batch: TrainBatch, reps_ND: torch.Tensor) -> LossOutput:
        num_local, num_neg = len(batch), batch.num_negatives
        q_BD, pos_BD = reps_ND[:num_local], reps_ND[num_local : 2 * num_local]
        neg_BKD = reps_ND[2 * num_local :].reshape(num_local, num_neg, -1) if num_neg else None
        q_keys, pos_keys = self._gathered_keys(batch)
        return contrastive_loss(
            q_BD,
            all_gather_with_grad(pos_BD),
            neg_BKD,
            q_keys=q_keys,
            pos_keys=pos_keys,
            rank=get_rank(),
            world_size=get_world_size(),
            neg_mask=batch.negatives_mask if num_neg else None,
            **self.loss_kwargs,
        )

    @staticmethod
    def _output(out: LossOutput, chunks: list[Chunk], start, encoded, scored, done) -> StepOutput:
        return StepOutput(
            loss=out,
            encode_seconds=encoded - start,
            loss_seconds=scored - encoded,
            backward_seconds=done - scored,
            num_real_tokens=int(sum(int(c.texts.attention_mask.sum()) for c in chunks if not c.is_filler)),
            num_padded_tokens=sum(c.num_padded_tokens for c in chunks if not c.is_filler),
            num_chunks=len(chunks),
        )


def _plain_backward(loss: torch.Tensor, last: bool) -> None:
    loss.backward()


def _check_batch(batch: TrainBatch) -> None:
    num_local = len(batch)
    if num_local == 0:
        raise ValueError("gradcache: empty batch (0 queries)")
    if len(batch.positive) != num_local:
        raise ValueError(f"gradcache: {num_local} queries but {len(batch.positive)} positives")
    if batch.negatives is not None and len(batch.negatives) % num_local:
        raise ValueError(
            f"gradcache: {len(batch.negatives)} negative texts is not a multiple of {num_local} queries "
            "(each query owns num_negatives rows)"
        )
    if batch.negatives_mask is not None and batch.negatives_mask.shape != (num_local, batch.num_negatives):
        raise ValueError(
            f"gradcache: negatives_mask has shape {tuple(batch.negatives_mask.shape)}, "
            f"expected ({num_local}, {batch.num_negatives})"
        )
