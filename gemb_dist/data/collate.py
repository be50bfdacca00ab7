"""Turns one rank's list of samples into a `TrainBatch`: prompts on queries, tokenization, negatives padding.

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

    def _tokenize(self, texts: list[str]) -> tuple[TextBatch, int]:
        """Tokenized, truncated, padded texts and how many of them were truncated."""
        if self.tokenizer is None:
            empty = torch.zeros((len(texts), 0), dtype=torch.int64)
            return TextBatch(empty, empty.clone()), 0
        if not self.tokenizer.is_fast:
            encoded = self._encode(texts)
            full = self.tokenizer(texts, truncation=False)["input_ids"]
            truncated = sum(1 for ids in full if len(ids) > self.max_length)
            return TextBatch(encoded["input_ids"], encoded["attention_mask"]), truncated
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
        return TextBatch(encoded["input_ids"], encoded["attention_mask"]), sum(overflowing)

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
            K = self.num_negatives
            negatives_mask_BK = torch.zeros((len(samples), K), dtype=torch.bool)
            negative_texts = []
            for i, sample in enumerate(samples):
                own = sample["negatives"][:K]  # beyond K are dropped: every row owns exactly K slots
                negatives_mask_BK[i, : len(own)] = True
                negative_texts += own + [""] * (K - len(own))
            batch.negatives, batch_stats["truncated_negatives"] = self._tokenize(negative_texts)
            batch.negatives_mask = negatives_mask_BK
        batch_stats["truncated_texts"] = (
            batch_stats["truncated_queries"] + batch_stats["truncated_positives"] + batch_stats["truncated_negatives"]
        )
        return batch
