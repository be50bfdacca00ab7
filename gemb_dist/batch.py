"""The batch a training step consumes: tokenized texts of each side plus the identity keys of the inputs.

The collator (`gemb_dist.data`) builds it, the gradient cache (`gemb_dist.gradcache`) consumes it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import torch


def text_key(text: str) -> int:
    """A stable signed 64-bit hash of a text, used for the duplicate mask (never embedding equality)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def text_keys(texts: list[str]) -> torch.Tensor:
    return torch.tensor([text_key(t) for t in texts], dtype=torch.int64)


@dataclass
class TextBatch:
    """Tokenized texts of one side: `input_ids_NL`, `attention_mask_NL` (1 = real token), and how they are padded:
    `padding_side` (the tokenizer's, never guessed from the tensors) and `pad_token_id`. A row whose mask is all
    zero is an absent text (a query with fewer hard negatives than slots), never a tokenized empty string."""

    input_ids: torch.Tensor  # [N, L] int64
    attention_mask: torch.Tensor  # [N, L] int64
    padding_side: Literal["left", "right"] = "right"
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"TextBatch.padding_side must be 'left' or 'right', got {self.padding_side!r}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:  # [N] real tokens per text
        return self.attention_mask.sum(dim=1)


@dataclass
class TrainBatch:
    """One rank's share of a global batch.

    `negatives` holds `num_negatives` texts per query, row-major (query i owns rows i*K:(i+1)*K);
    `negatives_mask` [B, K] marks which of them are real (a query may have fewer than K).
    Keys are hashes of the raw input texts (query: task + text; positive: text).
    """

    query: TextBatch  # [B, Lq]
    positive: TextBatch  # [B, Lp]
    query_keys: torch.Tensor  # [B] int64
    positive_keys: torch.Tensor  # [B] int64
    negatives: TextBatch | None = None  # [B*K, Ln]
    negatives_mask: torch.Tensor | None = None  # [B, K] bool
    tasks: list[str] = field(default_factory=list)  # [B]
    sample_ids: list[str] = field(default_factory=list)  # [B]
    stats: dict[str, int] = field(default_factory=dict)  # e.g. truncated texts, skipped samples

    def __len__(self) -> int:
        return len(self.query)

    @property
    def num_negatives(self) -> int:
        return 0 if self.negatives is None else len(self.negatives) // len(self.query)
