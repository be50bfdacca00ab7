"""Chunk planning of the gradient cache: which texts of a batch are encoded together, each chunk cut to its own
longest text on the side its tokenizer pads. Pure functions of a `TrainBatch` (no model, no engine); the one
collective, agreeing on a chunk count across ranks, is `_match_chunk_count`'s and has a pure core `fill_chunks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemb_dist.batch import TextBatch, TrainBatch
from gemb_dist.distributed import all_reduce_max_int


@dataclass
class Chunk:
    """Texts encoded together: `rows` index the flat list (queries, then positives, then negatives).

    A filler chunk (no rows) only keeps ranks in step: see `_match_chunk_count`.
    """

    rows: torch.Tensor  # [n] int64
    texts: TextBatch  # [n, L_chunk], L_chunk = the longest text of the chunk

    @property
    def is_filler(self) -> bool:
        return len(self.rows) == 0

    @property
    def num_padded_tokens(self) -> int:
        return self.texts.input_ids.numel()


def _flat_sources(batch: TrainBatch) -> list[TextBatch]:
    sources = [batch.query, batch.positive]
    if batch.negatives is not None and batch.num_negatives > 0:
        sources.append(batch.negatives)
    return sources


def plan_chunks(
    batch: TrainBatch, chunk_size: int, chunk_tokens: int | None = None, *, sort_by_length: bool = True
) -> list[Chunk]:
    """Pack the batch's texts into chunks of at most `chunk_size` texts and `chunk_tokens` padded tokens.

    Texts are taken longest first (arrival order when `sort_by_length=False`); a chunk is closed when
    the next text would break the count cap or the token budget (a single text longer than the budget
    gets a chunk of its own). Absent hard negatives (`negatives_mask` False) are not encoded.
    """
    if chunk_size <= 0 or (chunk_tokens is not None and chunk_tokens <= 0):
        raise ValueError(f"gradcache: chunk_size and chunk_tokens must be > 0, got {chunk_size}, {chunk_tokens}")
    sources = _flat_sources(batch)
    lengths = torch.cat([s.lengths for s in sources]).tolist()
    present = [True] * (2 * len(batch))
    if len(sources) == 3:
        mask = batch.negatives_mask
        present += [True] * len(batch.negatives) if mask is None else mask.reshape(-1).tolist()
    rows = [i for i in range(len(lengths)) if present[i]]
    if sort_by_length:
        rows.sort(key=lambda i: -lengths[i])  # stable: ties keep arrival order

    groups: list[list[int]] = []
    width = 0
    for i in rows:
        new_width = max(width, lengths[i], 1)
        full = groups and (
            len(groups[-1]) >= chunk_size
            or (chunk_tokens is not None and new_width * (len(groups[-1]) + 1) > chunk_tokens)
        )
        if not groups or full:
            groups.append([])
            new_width = max(lengths[i], 1)
        groups[-1].append(i)
        width = new_width
    return [_build_chunk(sources, g, max(max(lengths[i] for i in g), 1)) for g in groups]


def _build_chunk(sources: list[TextBatch], rows: list[int], width: int) -> Chunk:
    """Copy the chunk's rows out of their sides, each cut (or padded) to `width` on its own padding side."""
    first = sources[0]
    ids_NL = torch.empty(len(rows), width, dtype=first.input_ids.dtype, device=first.input_ids.device)
    mask_NL = torch.empty(len(rows), width, dtype=first.attention_mask.dtype, device=first.input_ids.device)
    offset = 0
    rows_t = torch.tensor(rows, dtype=torch.int64)
    for source in sources:
        left_padded = source.padding_side == "left"
        in_source = (rows_t >= offset) & (rows_t < offset + len(source))
        if in_source.any():
            picked = (rows_t[in_source] - offset).to(first.input_ids.device)
            ids, mask = source.input_ids[picked], source.attention_mask[picked]
            length = ids.shape[1]
            if length >= width:  # every picked text fits: drop padding columns only
                cols = slice(length - width, length) if left_padded else slice(0, width)
                ids, mask = ids[:, cols], mask[:, cols]
            else:  # a narrower side joins longer texts: pad it on its own padding side
                extra = (width - length, 0) if left_padded else (0, width - length)
                ids = torch.nn.functional.pad(ids, extra, value=source.pad_token_id)
                mask = torch.nn.functional.pad(mask, extra, value=0)
            ids_NL[in_source.to(ids_NL.device)] = ids
            mask_NL[in_source.to(ids_NL.device)] = mask
        offset += len(source)
    # Sides of one batch share a tokenizer; the chunk is padded as its first side is.
    texts = TextBatch(ids_NL, mask_NL, padding_side=first.padding_side, pad_token_id=first.pad_token_id)
    return Chunk(rows=rows_t, texts=texts)


def fill_chunks(chunks: list[Chunk], num_chunks: int) -> list[Chunk]:
    """`chunks` followed by filler chunks up to `num_chunks`: each a copy of the shortest text's real tokens,
    whose reps are discarded and whose backward carries a zero gradient."""
    missing = num_chunks - len(chunks)
    if missing <= 0:
        return chunks
    shortest = chunks[-1].texts  # chunks are planned longest first
    ids, mask = shortest.input_ids[-1:], shortest.attention_mask[-1:]
    real_cols = mask[0].nonzero().flatten()
    cols = slice(int(real_cols[0]), int(real_cols[-1]) + 1) if len(real_cols) else slice(0, 1)
    filler_texts = TextBatch(ids[:, cols], mask[:, cols], shortest.padding_side, shortest.pad_token_id)
    filler = Chunk(rows=torch.empty(0, dtype=torch.int64), texts=filler_texts)
    return chunks + [filler] * missing


def _match_chunk_count(chunks: list[Chunk]) -> list[Chunk]:
    """Pad with filler chunks so every rank runs the same number of forward and backward passes.

    Under ZeRO-3 each pass gathers the partitioned parameters, a collective every rank must join; ranks
    whose batches differ in present hard negatives or in text lengths plan different chunk counts.
    """
    return fill_chunks(chunks, all_reduce_max_int(len(chunks)))
