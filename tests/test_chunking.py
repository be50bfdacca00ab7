"""Property tests of chunk planning (pure: no model, no process group): whatever the lengths, padding side,
missing hard negatives and caps, every present text is encoded exactly once with all its tokens."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gemb_dist.batch import TextBatch, TrainBatch
from gemb_dist.chunking import fill_chunks, plan_chunks

PAD = 0


def side(lengths: list[int], padding_side: str, first_id: int) -> TextBatch:
    width = max(lengths, default=0)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.int64)
    mask = torch.zeros(len(lengths), width, dtype=torch.int64)
    for i, n in enumerate(lengths):
        cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[i, cols] = torch.arange(first_id + 100 * i, first_id + 100 * i + n)  # every token unique
        mask[i, cols] = 1
    return TextBatch(ids, mask, padding_side=padding_side, pad_token_id=PAD)


@st.composite
def batches(draw):
    num_local = draw(st.integers(1, 5))
    num_neg = draw(st.integers(0, 3))
    padding_side = draw(st.sampled_from(["left", "right"]))
    length = st.integers(1, 12)
    query = side(draw(st.lists(length, min_size=num_local, max_size=num_local)), padding_side, 10_000)
    positive = side(draw(st.lists(length, min_size=num_local, max_size=num_local)), padding_side, 20_000)
    if not num_neg:
        return TrainBatch(query, positive, torch.arange(num_local), torch.arange(num_local))
    mask_BK = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=num_neg, max_size=num_neg),
                                         min_size=num_local, max_size=num_local)))  # fmt: skip
    # absent negatives are all-padding rows, as the collator writes them
    neg_lengths = [n if present else 0 for n, present in zip(
        draw(st.lists(length, min_size=num_local * num_neg, max_size=num_local * num_neg)),
        mask_BK.reshape(-1).tolist(), strict=True)]  # fmt: skip
    negatives = side(neg_lengths, padding_side, 30_000)
    return TrainBatch(
        query, positive, torch.arange(num_local), torch.arange(num_local), negatives=negatives, negatives_mask=mask_BK
    )


def flat_texts(batch: TrainBatch) -> list[list[int] | None]:
    """Each flat row's real tokens, None for an absent negative."""
    sides = [batch.query, batch.positive] + ([batch.negatives] if batch.num_negatives else [])
    rows = [ids[mask.bool()].tolist() for s in sides for ids, mask in zip(s.input_ids, s.attention_mask, strict=True)]
    if batch.num_negatives:
        present = [True] * (2 * len(batch)) + batch.negatives_mask.reshape(-1).tolist()
        rows = [r if p else None for r, p in zip(rows, present, strict=True)]
    return rows


@settings(max_examples=80, deadline=None)
@given(batches(), st.integers(1, 6), st.one_of(st.none(), st.integers(1, 40)), st.booleans())
def test_every_present_text_is_encoded_once_whole_and_on_its_padding_side(batch, chunk_size, chunk_tokens, by_length):
    texts = flat_texts(batch)
    chunks = plan_chunks(batch, chunk_size, chunk_tokens, sort_by_length=by_length)
    rows = torch.cat([c.rows for c in chunks]).tolist()
    assert sorted(rows) == [i for i, t in enumerate(texts) if t is not None]  # present ones, each once
    for chunk in chunks:
        assert 1 <= len(chunk.rows) <= chunk_size and not chunk.is_filler
        lengths = [len(texts[r]) for r in chunk.rows.tolist()]
        assert chunk.texts.input_ids.shape[1] == max(lengths)  # cut to its longest text, nothing wider
        if chunk_tokens is not None and len(chunk.rows) > 1:
            assert chunk.num_padded_tokens <= chunk_tokens
        for row, ids, mask in zip(chunk.rows.tolist(), chunk.texts.input_ids, chunk.texts.attention_mask, strict=True):
            assert ids[mask.bool()].tolist() == texts[row]  # no token lost, none invented
            assert (ids[~mask.bool()] == PAD).all()
            order = sorted(mask.tolist(), reverse=batch.query.padding_side == "right")
            assert mask.tolist() == order  # real tokens stay contiguous on the declared side


@settings(max_examples=50, deadline=None)
@given(batches(), st.integers(1, 6), st.integers(0, 8))
def test_fillers_bring_every_rank_to_the_same_count_without_rows(batch, chunk_size, extra):
    chunks = plan_chunks(batch, chunk_size)
    target = len(chunks) + extra
    filled = fill_chunks(chunks, target)
    assert len(filled) == target and filled[: len(chunks)] == chunks
    shortest = chunks[-1].texts
    want = shortest.input_ids[-1][shortest.attention_mask[-1].bool()].tolist()
    for filler in filled[len(chunks) :]:
        assert filler.is_filler and filler.texts.attention_mask.all()  # real tokens only: one short pass
        assert filler.texts.input_ids[0].tolist() == want
    assert fill_chunks(chunks, len(chunks) - 1) == chunks  # never fewer than planned
