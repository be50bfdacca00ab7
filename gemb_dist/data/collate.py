"""Turns one rank's list of samples into a `TrainBatch`: prompts on queries, tokenization, negatives padding.

Padding is explicit: every side carries its tokenizer's padding side and pad id, and an absent hard negative
(a query with fewer than `num_negatives`) is an all-padding row with a False mask, never a tokenized "".

Runs inside the DataLoader workers, so tokenization overlaps training. Without a tokenizer (audits, dry runs)
the text tensors are empty and only identities, tasks and counts are filled in.
"""

from __future__ import annotations

from typing import Any

import torch

from gemb_dist.batch import TextBatch, TrainBatch, text_keys
from gemb_dist.prompts import format_query

CHARS_PER_TOKEN_BOUND = 8  # texts are cut past max_length * this many characters before tokenization


def _cut_at_whitespace(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = max(text.rfind(" ", 0, limit), text.rfind("\n", 0, limit))
    return text[:cut] if cut > 0 else text


class Collator:
    def __init__(
        self,
        tokenizer: Any | None,
        max_length: int,
        num_negatives: int,
        prompts: dict[str, str] | None = None,
        default_prompt: str = "{text}",
    ):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.num_negatives = num_negatives
        self.prompts = dict(prompts or {})
        self.default_prompt = default_prompt

    def _encode(self, texts: list[str]):
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")

    def _text_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextBatch:
        if self.tokenizer is None:
            return TextBatch(input_ids, attention_mask)
        pad_id = self.tokenizer.pad_token_id
        return TextBatch(input_ids, attention_mask, self.tokenizer.padding_side, 0 if pad_id is None else pad_id)

    def _tokenize(self, texts: list[str]) -> tuple[TextBatch, int]:
        """Tokenized, truncated, padded texts and how many of them were truncated."""
        if self.tokenizer is None or not texts:
            empty = torch.zeros((len(texts), 0), dtype=torch.int64)
            return self._text_batch(empty, empty.clone()), 0
        if not self.tokenizer.is_fast:
            encoded = self._encode(texts)
            full = self.tokenizer(texts, truncation=False)["input_ids"]
            truncated = sum(1 for ids in full if len(ids) > self.max_length)
            return self._text_batch(encoded["input_ids"], encoded["attention_mask"]), truncated
        # Tokenizers read the whole text before truncating, so long documents cost far more than the tokens
        # kept. Cut them at a whitespace boundary well past the token limit (earlier words tokenize the same);
        # a cut text that no longer overflows may have lost tokens, so then the batch is encoded in full.
        limit = self.max_length * CHARS_PER_TOKEN_BOUND
        heads = [_cut_at_whitespace(t, limit) for t in texts]
        encoded = self._encode(heads)
        overflowing = [bool(e.overflowing) for e in encoded.encodings]
        if any(len(h) < len(t) and not o for h, t, o in zip(heads, texts, overflowing, strict=True)):
            encoded = self._encode(texts)
            overflowing = [bool(e.overflowing) for e in encoded.encodings]
        return self._text_batch(encoded["input_ids"], encoded["attention_mask"]), sum(overflowing)

    def __call__(self, samples: list[dict[str, Any]], stats: dict[str, int] | None = None) -> TrainBatch:
        tasks = [s["task"] for s in samples]
        queries = [format_query(s["query"], s["task"], self.prompts, self.default_prompt) for s in samples]
        positives = [s["positive"] for s in samples]
        query_batch, truncated_queries = self._tokenize(queries)
        positive_batch, truncated_positives = self._tokenize(positives)
        batch_stats = dict(stats or {})
        batch_stats.update(
            samples=len(samples),
            truncated_queries=truncated_queries,
            truncated_positives=truncated_positives,
            truncated_negatives=0,
        )
        batch = TrainBatch(
            query=query_batch,
            positive=positive_batch,
            # the key is the raw query with its task, so the same question asked for two tasks stays distinct
            query_keys=text_keys([f"{s['task']}\x00{s['query']}" for s in samples]),
            positive_keys=text_keys(positives),
            tasks=tasks,
            sample_ids=[s["id"] for s in samples],
            stats=batch_stats,
        )
        if self.num_negatives > 0:
            batch.negatives, batch.negatives_mask, batch_stats["truncated_negatives"] = self._negatives(samples)
        batch_stats["truncated_texts"] = (
            batch_stats["truncated_queries"] + batch_stats["truncated_positives"] + batch_stats["truncated_negatives"]
        )
        return batch

    def _negatives(self, samples: list[dict[str, Any]]) -> tuple[TextBatch, torch.Tensor, int]:
        """[B*K, L] negatives (query i owns rows i*K:(i+1)*K), the [B, K] mask of present ones, and the count
        truncated. Only present negatives are tokenized; absent slots are all padding."""
        K = self.num_negatives
        negatives_mask_BK = torch.zeros((len(samples), K), dtype=torch.bool)
        present_texts = []
        for i, sample in enumerate(samples):
            own = sample["negatives"][:K]  # beyond K are dropped: every row owns exactly K slots
            negatives_mask_BK[i, : len(own)] = True
            present_texts += own
        present, truncated = self._tokenize(present_texts)
        rows = negatives_mask_BK.reshape(-1).nonzero().flatten()  # [P] slots of the present negatives
        ids_NL = present.input_ids.new_full((len(samples) * K, present.input_ids.shape[1]), present.pad_token_id)
        mask_NL = present.attention_mask.new_zeros((len(samples) * K, present.attention_mask.shape[1]))
        ids_NL[rows], mask_NL[rows] = present.input_ids, present.attention_mask
        negatives = TextBatch(ids_NL, mask_NL, present.padding_side, present.pad_token_id)
        return negatives, negatives_mask_BK, truncated
