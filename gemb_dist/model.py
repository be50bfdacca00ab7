"""The embedding model: a Hugging Face backbone, masked mean pooling and a linear projection to D = max(mrl_dims).

A saved model directory holds `model.safetensors` (the backbone's own parameter names plus `projection.weight`
and `projection.bias`, so the directory also loads as a plain transformers model of the backbone),
`config.json` (the backbone), `gemb_config.json` (the `ModelConfig`) and the tokenizer files. No pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel
from transformers.initialization import no_init_weights

from gemb_dist.attention import set_attention
from gemb_dist.batch import TextBatch
from gemb_dist.config import ModelConfig
from gemb_dist.files import atomic_dir
from gemb_dist.prompts import format_query

WEIGHTS_NAME = "model.safetensors"
GEMB_CONFIG_NAME = "gemb_config.json"
BACKBONE_CONFIG_NAME = "config.json"
PROJECTION_KEYS = ("projection.weight", "projection.bias")
PROJECTION_FILE = "projection.safetensors"  # the `hf` export layout keeps the projection apart
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def is_gemb_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / GEMB_CONFIG_NAME).is_file()


def mean_pool(states_NLH: torch.Tensor, attention_mask_NL: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over real tokens only (mask 1); accumulated in float32. Returns [N, H]."""
    mask_NL1 = attention_mask_NL.unsqueeze(-1).to(torch.float32)
    summed_NH = (states_NLH.to(torch.float32) * mask_NL1).sum(dim=1)
    counts_N1 = mask_NL1.sum(dim=1).clamp(min=1.0)  # an all-padding row pools to zeros instead of NaN
    return summed_NH / counts_N1


def to_right_padding(input_ids_NL: torch.Tensor, attention_mask_NL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every row's real tokens to the front, keeping their order.

    Backbones derive positions from the token index (absolute embeddings, RoPE), so the same text left-padded
    would otherwise see shifted positions; normalising the layout makes the pooled result independent of the
    tokenizer's padding side.
    """
    is_pad_NL = attention_mask_NL == 0
    if not bool((is_pad_NL[:, :-1] & ~is_pad_NL[:, 1:]).any()):  # already right padded
        return input_ids_NL, attention_mask_NL
    order_NL = torch.argsort(is_pad_NL.to(torch.int8), dim=1, stable=True)
    return input_ids_NL.gather(1, order_NL), attention_mask_NL.gather(1, order_NL)


def new_projection(hidden: int, embedding_dim: int, init: str, dtype: torch.dtype) -> nn.Linear:
    """A fresh `hidden -> embedding_dim` projection (`model.projection_init`).

    `identity` keeps a pretrained model's pooled embedding as it is: the first min(D, hidden) outputs copy the
    pooled coordinates, so every MRL prefix up to the hidden size is the original embedding's prefix. Extra rows
    (D > hidden) keep the random init: the loss's gradient on an all-zero coordinate is zero on both sides, so
    zero rows would stay zero for the whole run.
    """
    projection = nn.Linear(hidden, embedding_dim, bias=True, dtype=dtype)
    if init == "identity":
        kept = min(hidden, embedding_dim)
        with torch.no_grad():
            projection.weight[:kept].copy_(torch.eye(kept, hidden, dtype=dtype))
            projection.bias.zero_()
    return projection


@torch.no_grad()
def pca_projection(model: EmbeddingModel, texts: Sequence[str], batch_size: int = 32) -> nn.Linear:
    """A projection onto the principal axes of `texts`' pooled embeddings, largest variance first.

    Fitted on the covariance of the L2-normalised pooled embeddings (the geometry cosine scores see). The first
    min(D, hidden) rows are orthonormal and the bias is zero: with D == hidden it is a rotation, so every full-size
    cosine (every ranking) equals that of the identity projection, while each MRL prefix keeps the directions along
    which these texts differ most, instead of whichever coordinates the backbone happens to put first. Rows past the
    hidden size (D > hidden) keep nn.Linear's random init, as with `identity`. Axis signs are fixed (largest entry
    positive), so the result depends only on the model and the texts.
    """
    if isinstance(texts, str) or len(texts) < 2:
        raise ValueError("pca_projection needs a list of at least two texts")
    was_training = model.training
    model.eval()
    try:
        device = model.projection.weight.device
        pooled = []
        for start in range(0, len(texts), batch_size):
            batch = model.tokenize(list(texts[start : start + batch_size]))
            pooled.append(model.pool(batch.input_ids.to(device), batch.attention_mask.to(device)))
    finally:
        model.train(was_training)
    unit_NH = F.normalize(torch.cat(pooled).double(), dim=-1)
    centred_NH = unit_NH - unit_NH.mean(dim=0)
    eigenvalues_H, axes_HH = torch.linalg.eigh(centred_NH.T @ centred_NH)  # ascending eigenvalues, axes as columns
    axes_HH = axes_HH[:, torch.argsort(eigenvalues_H, descending=True)]
    largest_H = axes_HH.gather(0, axes_HH.abs().argmax(dim=0, keepdim=True)).squeeze(0)
    rotation_HH = (axes_HH * torch.sign(largest_H)).T  # row k = the k-th principal axis
    hidden, dtype = rotation_HH.shape[0], model.projection.weight.dtype
    projection = new_projection(hidden, model.embedding_dim, "random", dtype).to(device)
    kept = min(hidden, model.embedding_dim)
    projection.weight[:kept].copy_(rotation_HH[:kept].to(dtype))
    projection.bias.zero_()
    return projection


class EmbeddingModel(nn.Module):
    """Backbone -> masked mean pooling -> linear projection to `embedding_dim` = max(config.mrl_dims)."""

    def __init__(self, config: ModelConfig, backbone: PreTrainedModel, tokenizer, projection: nn.Linear | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.embedding_dim = max(config.mrl_dims)
        hidden = backbone.config.get_text_config().hidden_size
        if projection is None:
            projection = new_projection(hidden, self.embedding_dim, config.projection_init, backbone.dtype)
        if projection.in_features != hidden or projection.out_features != self.embedding_dim:
            raise ValueError(
                f"projection is {projection.in_features}->{projection.out_features} but the backbone hidden size is "
                f"{hidden} and max(model.mrl_dims) is {self.embedding_dim}"
            )
        self.projection = projection
        self.is_decoder = set_attention(backbone, config.attention)
        if config.gradient_checkpointing:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if tokenizer is not None and tokenizer.pad_token is None:
            # Decoder tokenizers often lack a pad token; padding is masked out, so any existing token serves.
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: ModelConfig) -> EmbeddingModel:
        """Build from `config.name_or_path` (local HF dir, saved gemb dir or hub id) or `config.backbone_config`.

        With `backbone_config` the backbone is randomly initialised (seed with `torch.manual_seed` first).
        Loading a saved gemb dir keeps its stored settings except the fields set explicitly in `config`.
        """
        if config.backbone_config is None and is_gemb_dir(config.name_or_path):
            return cls.load(config.name_or_path, **_explicit_fields(config))
        tokenizer = _load_tokenizer(config.tokenizer or config.name_or_path, config.trust_remote_code)
        common = {"trust_remote_code": config.trust_remote_code}
        if config.attn_implementation is not None:
            common["attn_implementation"] = config.attn_implementation
        if config.backbone_config is not None:
            backbone = AutoModel.from_config(_random_backbone_config(config), dtype=_DTYPES[config.dtype], **common)
        else:
            _check_local_path(config.name_or_path)
            backbone = AutoModel.from_pretrained(config.name_or_path, dtype=_DTYPES[config.dtype], **common)
        return cls(config, backbone, tokenizer)

    @classmethod
    def without_weights(cls, config: ModelConfig) -> EmbeddingModel:
        """The model `from_config(config)` builds, every tensor on the meta device: its configs, tokenizer and
        parameter names and shapes, without reading or initialising any weights (a consolidated checkpoint gets
        its non-weight files from it, so no base weights need to be where it is consolidated)."""
        if config.backbone_config is None and is_gemb_dir(config.name_or_path):
            config = _stored_config(Path(config.name_or_path), _explicit_fields(config))
        tokenizer = _load_tokenizer(config.tokenizer or config.name_or_path, config.trust_remote_code)
        if config.backbone_config is not None:
            hf_config = _random_backbone_config(config)
        else:
            _check_local_path(config.name_or_path)
            hf_config = AutoConfig.from_pretrained(config.name_or_path, trust_remote_code=config.trust_remote_code)
        kwargs = {"trust_remote_code": config.trust_remote_code, "dtype": _DTYPES[config.dtype]}
        if config.attn_implementation is not None:
            kwargs["attn_implementation"] = config.attn_implementation
        with torch.device("meta"), no_init_weights():
            backbone = AutoModel.from_config(hf_config, **kwargs)
            hidden = backbone.config.get_text_config().hidden_size
            projection = nn.Linear(hidden, max(config.mrl_dims), bias=True, dtype=_DTYPES[config.dtype])
        return cls(config, backbone, tokenizer, projection)

    # ---------------------------------------------------------------- encoding
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unnormalised embeddings [N, D] of tokenized texts ([N, L] ids and mask, either padding side)."""
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                "must have the same [N, L] shape"
            )
        pooled_NH = self.pool(input_ids, attention_mask)
        return self.projection(pooled_NH.to(self.projection.weight.dtype))

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The backbone's mean-pooled token states [N, H] (float32), before the projection."""
        input_ids_NL, attention_mask_NL = to_right_padding(input_ids, attention_mask)
        states_NLH = self.backbone(input_ids=input_ids_NL, attention_mask=attention_mask_NL).last_hidden_state
        return mean_pool(states_NLH, attention_mask_NL)

    def encode_batch(self, batch: TextBatch) -> torch.Tensor:
        device = self.projection.weight.device
        return self(batch.input_ids.to(device), batch.attention_mask.to(device))

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> TextBatch:
        """Tokenize with truncation to `max_length` (default `config.max_length`) and padding to the longest."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of texts, not a single string")
        encoded = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=max_length or self.config.max_length,
            return_tensors="pt",
        )
        pad_id = self.tokenizer.pad_token_id or 0
        return TextBatch(encoded["input_ids"], encoded["attention_mask"], self.tokenizer.padding_side, pad_id)

    def format_queries(self, texts: Sequence[str], task: str | None = None) -> list[str]:
        """Apply the task's query template (documents never get one)."""
        return [format_query(t, task, self.config.prompts, self.config.default_prompt) for t in texts]

    @torch.no_grad()
    def embed(
        self,
        texts: Sequence[str],
        *,
        task: str | None = None,
        is_query: bool = False,
        dim: int | None = None,
        batch_size: int = 32,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Embeddings [N, dim] in input order: the first `dim` coordinates, L2-renormalised when `normalize`.

        Texts are encoded in batches sorted by length to cut padding; runs in eval mode and restores the mode.
        """
        if isinstance(texts, str):
            raise TypeError("embed expects a list of texts, not a single string")
        dim = self.embedding_dim if dim is None else dim
        if not 1 <= dim <= self.embedding_dim:
            raise ValueError(
                f"dim must be in [1, {self.embedding_dim}] (model.mrl_dims={self.config.mrl_dims}), got {dim}"
            )
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        texts = self.format_queries(texts, task) if is_query else list(texts)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        was_training = self.training
        self.eval()
        try:
            chunks = [
                self.encode_batch(self.tokenize([texts[i] for i in order[s : s + batch_size]]))
                for s in range(0, len(order), batch_size)
            ]
        finally:
            self.train(was_training)
        device = self.projection.weight.device
        if not chunks:
            return torch.empty(0, dim, device=device)
        sorted_ND = torch.cat(chunks)[:, :dim].float()
        reps_ND = torch.empty_like(sorted_ND)
        reps_ND[torch.tensor(order, device=device)] = sorted_ND
        return F.normalize(reps_ND, dim=-1) if normalize else reps_ND

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the model directory atomically (temp dir beside it, then rename)."""
        with atomic_dir(path) as tmp:
            self.write_files(tmp)

    def write_files(self, directory: Path) -> None:
        """Write the model's files into an existing directory (not atomic; `save` wraps it)."""
        tensors = _unshared({k: v.detach().cpu() for k, v in self.backbone.state_dict().items()})
        clash = [k for k in PROJECTION_KEYS if k in tensors]
        assert not clash, f"backbone parameter names clash with the projection: {clash}"
        tensors["projection.weight"] = self.projection.weight.detach().cpu().contiguous()
        tensors["projection.bias"] = self.projection.bias.detach().cpu().contiguous()
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        self.write_model_files(directory)

    def write_model_files(self, directory: Path) -> None:
        """Every file of the model directory but the weights: the backbone's config.json, gemb_config.json and
        the tokenizer files."""
        self.backbone.config.save_pretrained(str(directory))  # keeps `is_causal`, the attention direction
        saved_config = self.config.model_copy(update={"name_or_path": ".", "backbone_config": None, "tokenizer": None})
        (directory / GEMB_CONFIG_NAME).write_text(saved_config.model_dump_json(indent=2) + "\n")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))

    @classmethod
    def load(cls, path: str | os.PathLike, **config_overrides) -> EmbeddingModel:
        """Load a directory written by `save`; `config_overrides` replace stored `ModelConfig` fields."""
        directory = Path(path)
        for name in (GEMB_CONFIG_NAME, BACKBONE_CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise ValueError(f"{directory / name}: missing; not a gemb model directory (written by save())")
        config = _stored_config(directory, config_overrides)
        tokenizer = _load_tokenizer(str(directory), config.trust_remote_code)
        kwargs = {"trust_remote_code": config.trust_remote_code, "dtype": _DTYPES[config.dtype]}
        if config.attn_implementation is not None:
            kwargs["attn_implementation"] = config.attn_implementation
        if (directory / PROJECTION_FILE).is_file():  # the `hf` export layout: a plain transformers backbone dir
            backbone = AutoModel.from_pretrained(str(directory), **kwargs)
            projection = _load_projection(directory / PROJECTION_FILE, "", backbone.dtype)
        else:
            hf_config = AutoConfig.from_pretrained(str(directory), trust_remote_code=config.trust_remote_code)
            with no_init_weights():  # every tensor is overwritten from the file; skip the costly random init
                backbone = AutoModel.from_config(hf_config, **kwargs)
            _load_backbone_state(backbone, directory / WEIGHTS_NAME)
            projection = _load_projection(directory / WEIGHTS_NAME, "projection.", backbone.dtype)
        return cls(config, backbone, tokenizer, projection)

    def export_sentence_transformers(self, path: str | os.PathLike) -> None:
        from gemb_dist.export import export_sentence_transformers

        export_sentence_transformers(self, path)


def copy_model_files(source: Path, target: Path) -> None:
    """Copy the configs and tokenizer files of a model dir into `target` (not its weights, nor DeepSpeed's
    `latest` file and scripts, which a DeepSpeed save dir holding the model's files also has)."""
    for item in source.iterdir():
        if item.is_file() and item.name not in (WEIGHTS_NAME, "latest") and item.suffix not in (".py", ".pt"):
            shutil.copy2(item, target / item.name)


# -------------------------------------------------------------------- helpers
def _explicit_fields(config: ModelConfig) -> dict:
    """The fields set explicitly in `config`: they override a saved model's stored settings."""
    return {k: getattr(config, k) for k in config.model_fields_set if k != "name_or_path"}


def _stored_config(directory: Path, overrides: dict) -> ModelConfig:
    """The ModelConfig a saved gemb dir declares, `overrides` applied, naming the directory as its source."""
    try:
        stored = json.loads((directory / GEMB_CONFIG_NAME).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{directory / GEMB_CONFIG_NAME}: invalid JSON at line {err.lineno}: {err.msg}") from err
    config = ModelConfig.model_validate({**stored, **overrides, "name_or_path": str(directory)})
    return config.model_copy(update={"backbone_config": None})


def _random_backbone_config(config: ModelConfig):
    backbone_config = dict(config.backbone_config)
    if "model_type" not in backbone_config:
        raise ValueError("model.backbone_config needs a 'model_type' (e.g. 'llama', 'bert')")
    return AutoConfig.for_model(**backbone_config)


def _check_local_path(name_or_path: str) -> None:
    """A path-like name that does not exist is a mistake, not a hub id."""
    path = Path(name_or_path).expanduser()
    if name_or_path.startswith((".", "/", "~")) and not path.exists():
        raise ValueError(f"model.name_or_path: directory {name_or_path} does not exist")
    if path.is_dir() and not (path / BACKBONE_CONFIG_NAME).is_file():
        raise ValueError(
            f"{path / BACKBONE_CONFIG_NAME}: missing; {name_or_path} is not a Hugging Face model directory"
        )


def _load_tokenizer(name_or_path: str, trust_remote_code: bool):
    path = Path(name_or_path).expanduser()
    if name_or_path.startswith((".", "/", "~")) and not path.exists():
        raise ValueError(f"model.tokenizer: {name_or_path} does not exist")
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no shared storage (safetensors refuses aliases, e.g. tied embeddings)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in tensors.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone().contiguous() if key in seen else tensor.contiguous()
        seen.add(key)
    return out


def _load_backbone_state(backbone: PreTrainedModel, weights: Path) -> None:
    """Copy the stored backbone tensors into `backbone`, exactly; every parameter and buffer must be present."""
    expected = backbone.state_dict()
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        # A tied tensor stored once (e.g. by zero_to_fp32) is filled through the name it shares storage with.
        stored_storages = {expected[k].untyped_storage().data_ptr() for k in expected if k in keys}
        missing = sorted(
            k for k in set(expected) - keys if expected[k].untyped_storage().data_ptr() not in stored_storages
        )
        unexpected = sorted(keys - set(expected) - set(PROJECTION_KEYS))
        if missing or unexpected:
            raise ValueError(
                f"{weights}: tensors do not match the backbone described by config.json "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        backbone.load_state_dict({k: f.get_tensor(k) for k in expected if k in keys}, strict=False)


def _load_projection(weights: Path, prefix: str, dtype: torch.dtype) -> nn.Linear:
    with safe_open(str(weights), framework="pt") as f:
        names = (f"{prefix}weight", f"{prefix}bias")
        if not set(names) <= set(f.keys()):
            raise ValueError(f"{weights}: no projection tensors {list(names)}")
        weight_DH, bias_D = (f.get_tensor(n) for n in names)
    projection = nn.Linear(weight_DH.shape[1], weight_DH.shape[0], bias=True, dtype=dtype)
    with torch.no_grad():
        projection.weight.copy_(weight_DH)
        projection.bias.copy_(bias_D)
    return projection
