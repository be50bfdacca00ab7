"""Bidirectional attention for decoder backbones (Llama, Qwen2/3, Mistral, Gemma, ...) in transformers 5.x.

transformers (>= 5.2) supports `is_causal = False` on a decoder's config: `masking_utils.create_causal_mask`
(and its sliding-window variant) then builds a bidirectional, padding-only mask, and the model's forward
passes `is_causal=False` down to the attention kernels. The flag is part of the saved `config.json`, so a
saved or exported backbone stays bidirectional when loaded by plain transformers or sentence-transformers.
The attention modules' own `is_causal` attributes are switched too, for kernels that read them directly.
Encoders (BERT, MiniLM, ...) have no causal attention and are left untouched.
"""

from __future__ import annotations

from typing import Literal

from torch import nn
from transformers import PreTrainedConfig

AttentionMode = Literal["bidirectional", "causal"]


def _configs(backbone: nn.Module) -> list[PreTrainedConfig]:
    """Every distinct transformers config reachable from the backbone's modules (multimodal models nest them)."""
    seen: dict[int, PreTrainedConfig] = {}
    for module in backbone.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PreTrainedConfig):
            seen.setdefault(id(config), config)
            for name in ("text_config", "decoder_config"):
                sub = getattr(config, name, None)
                if isinstance(sub, PreTrainedConfig):
                    seen.setdefault(id(sub), sub)
    return list(seen.values())


def _causal_flag_modules(backbone: nn.Module) -> list[nn.Module]:
    """Attention modules that carry an `is_causal` flag the kernels read."""
    return [m for m in backbone.modules() if isinstance(getattr(m, "is_causal", None), bool)]


def is_decoder_backbone(backbone: nn.Module) -> bool:
    """True when the backbone attends causally as built by transformers (or was already switched by us)."""
    if any(m.is_causal for m in _causal_flag_modules(backbone)):
        return True
    return any(
        getattr(c, "is_causal", True) is False or getattr(c, "use_bidirectional_attention", False)
        for c in _configs(backbone)
    )


def set_attention(backbone: nn.Module, mode: AttentionMode) -> bool:
    """Switch a decoder backbone between bidirectional and causal attention, in place.

    Returns whether the backbone is a decoder (for an encoder nothing is changed and False is returned).
    """
    if mode not in ("bidirectional", "causal"):
        raise ValueError(f"model.attention must be 'bidirectional' or 'causal', got {mode!r}")
    if not is_decoder_backbone(backbone):
        return False
    causal = mode == "causal"
    for config in _configs(backbone):
        config.is_causal = causal
        # Gemma-family configs carry their own switch; their modelling code reads it besides `is_causal`.
        if hasattr(config, "use_bidirectional_attention"):
            config.use_bidirectional_attention = not causal
    for module in _causal_flag_modules(backbone):
        module.is_causal = causal
    return True
