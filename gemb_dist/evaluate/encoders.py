"""Text encoders behind one protocol: a saved gemb model dir, a sentence-transformers dir, or a plain Hugging Face
model dir (masked mean pooling); optionally spread over Ray actors for large corpora."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm


@runtime_checkable
class Encoder(Protocol):
    name: str
    dim: int  # full embedding size
    mrl_dims: list[int] | None  # Matryoshka sizes the model was trained for, when known

    def encode(self, texts: Sequence[str], *, is_query: bool, task: str | None) -> np.ndarray:
        """Embeddings [N, dim] (float32, any norm) in input order; queries get the task's prompt."""
        ...


def length_sorted_batches(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Index batches of texts sorted longest first, so each batch pads to similar lengths."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _encode_batched(texts: Sequence[str], batch_size: int, progress: bool, encode_batch, desc: str) -> np.ndarray:
    batches = length_sorted_batches(texts, batch_size)
    out: np.ndarray | None = None
    for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        emb_BD = encode_batch([texts[i] for i in batch])
        if out is None:
            out = np.empty((len(texts), emb_BD.shape[1]), dtype=np.float32)
        out[batch] = emb_BD
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


class GembEncoder:
    """A saved gemb model dir: queries get the task prompt from its config, documents none. `max_length` replaces
    the stored `model.max_length` (the length it was trained at)."""

    def __init__(
        self,
        path: str,
        batch_size: int = 32,
        device: str | None = None,
        progress: bool = True,
        max_length: int | None = None,
    ):
        from gemb_dist.model import EmbeddingModel

        overrides = {"max_length": max_length} if max_length else {}
        self.model = EmbeddingModel.load(path, **overrides).to(device or "cpu").eval()
        self.name, self.batch_size, self.progress = path, batch_size, progress
        self.dim = self.model.embedding_dim
        self.mrl_dims = list(self.model.config.mrl_dims)

    def encode(self, texts: Sequence[str], *, is_query: bool, task: str | None) -> np.ndarray:
        def batch(chunk: list[str]) -> np.ndarray:
            emb = self.model.embed(chunk, task=task, is_query=is_query, batch_size=len(chunk), normalize=False)
            return emb.cpu().numpy()

        return _encode_batched(texts, self.batch_size, self.progress, batch, "encode queries" if is_query else "encode")


class SentenceTransformerEncoder:
    """A sentence-transformers dir; its stored prompts are used for queries (task name first, then 'query').
    `max_length` replaces its `max_seq_length`."""

    def __init__(
        self,
        path: str,
        batch_size: int = 32,
        device: str | None = None,
        progress: bool = True,
        max_length: int | None = None,
    ):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device=device or "cpu")
        if max_length:
            self.model.max_seq_length = max_length
        self.name, self.batch_size, self.progress = path, batch_size, progress
        self.dim = int(self.model.get_embedding_dimension())
        export_info = Path(path) / "gemb_export.json"  # written by `gemb export`: the MRL dims it was trained for
        self.mrl_dims = json.loads(export_info.read_text()).get("mrl_dims") if export_info.is_file() else None

    def prompt_name(self, is_query: bool, task: str | None) -> str | None:
        prompts = self.model.prompts or {}
        names = [task, "query"] if is_query else ["document", "passage"]
        return next((n for n in names if n and n in prompts), None)

    def encode(self, texts: Sequence[str], *, is_query: bool, task: str | None) -> np.ndarray:
        # sentence-transformers batches by length itself and draws its own progress bar.
        emb = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            prompt_name=self.prompt_name(is_query, task),
            show_progress_bar=self.progress,
            convert_to_numpy=True,
        )
        return np.asarray(emb, dtype=np.float32)


class MeanPoolingEncoder:
    """A plain Hugging Face model dir: masked mean of the last hidden states, no prompts."""

    def __init__(
        self,
        path: str,
        batch_size: int = 32,
        device: str | None = None,
        progress: bool = True,
        max_length: int | None = None,
    ):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device or "cpu").eval()
        self.name, self.batch_size, self.progress = path, batch_size, progress
        self.max_length = min(max_length or 512, self.tokenizer.model_max_length)
        self.dim = int(self.model.config.hidden_size)
        self.mrl_dims = None

    @torch.no_grad()
    def _encode_batch(self, chunk: list[str]) -> np.ndarray:
        from gemb_dist.model import mean_pool

        tokens = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        tokens = tokens.to(self.model.device)
        states_BLH = self.model(**tokens).last_hidden_state
        return mean_pool(states_BLH, tokens["attention_mask"]).cpu().numpy()

    def encode(self, texts: Sequence[str], *, is_query: bool, task: str | None) -> np.ndarray:
        return _encode_batched(texts, self.batch_size, self.progress, self._encode_batch, "encode")


def load_local_encoder(
    model: str,
    batch_size: int = 32,
    device: str | None = None,
    progress: bool = True,
    max_length: int | None = None,
) -> Encoder:
    """Pick the loader by the files in `model`: gemb_config.json, modules.json (sentence-transformers), config.json.
    `max_length` (tokens per text) replaces the model's own limit, so that models of every kind compare at one."""
    path = Path(model)
    if not path.is_dir():
        raise ValueError(f"--model {model}: directory not found")
    kwargs = {"batch_size": batch_size, "device": device, "progress": progress, "max_length": max_length}
    if (path / "gemb_config.json").is_file():
        return GembEncoder(model, **kwargs)
    if (path / "modules.json").is_file():
        return SentenceTransformerEncoder(model, **kwargs)
    if (path / "config.json").is_file():
        return MeanPoolingEncoder(model, **kwargs)
    raise ValueError(
        f"--model {model}: not a gemb model dir (gemb_config.json), a sentence-transformers dir (modules.json) "
        "or a Hugging Face model dir (config.json)"
    )


class RayEncoder:
    """Splits each encode call into contiguous shards encoded by `num_actors` Ray actors, each holding the model.

    Connects to the current Ray cluster (`ray.init()` inside a Ray job, or RAY_ADDRESS), else starts a local one.
    """

    def __init__(
        self,
        model: str,
        num_actors: int,
        batch_size: int = 32,
        device: str | None = None,
        max_length: int | None = None,
    ):
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"))
        actor_cls = ray.remote(num_cpus=1)(_EncoderActor)
        self.actors = [actor_cls.remote(model, batch_size, device, max_length) for _ in range(num_actors)]
        self.name, self.dim, self.mrl_dims = ray.get(self.actors[0].info.remote())
        self.min_shard = batch_size

    def encode(self, texts: Sequence[str], *, is_query: bool, task: str | None) -> np.ndarray:
        import ray

        num_shards = max(1, min(len(self.actors), len(texts) // self.min_shard))
        bounds = np.linspace(0, len(texts), num_shards + 1).astype(int)
        futures = [
            actor.encode.remote(list(texts[a:b]), is_query, task)
            for actor, a, b in zip(self.actors, bounds[:-1], bounds[1:], strict=False)
        ]
        return np.concatenate(ray.get(futures), axis=0)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


class _EncoderActor:
    def __init__(self, model: str, batch_size: int, device: str | None, max_length: int | None):
        torch.set_num_threads(1)
        self.encoder = load_local_encoder(
            model, batch_size=batch_size, device=device, progress=False, max_length=max_length
        )

    def info(self) -> tuple[str, int, list[int] | None]:
        return self.encoder.name, self.encoder.dim, self.encoder.mrl_dims

    def encode(self, texts: list[str], is_query: bool, task: str | None) -> np.ndarray:
        return self.encoder.encode(texts, is_query=is_query, task=task)


def load_encoder(
    model: str,
    *,
    batch_size: int = 32,
    device: str | None = None,
    progress: bool = True,
    ray_actors: int = 0,
    max_length: int | None = None,
) -> Encoder:
    """The encoder for `model`; with `ray_actors > 0` encoding runs on that many Ray actors. `max_length` (None =
    the model's own) is the token limit per text."""
    if ray_actors > 0:
        return RayEncoder(model, ray_actors, batch_size=batch_size, device=device, max_length=max_length)
    return load_local_encoder(model, batch_size=batch_size, device=device, progress=progress, max_length=max_length)
