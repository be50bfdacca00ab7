"""Checkpoints through Ray Train: the whole training state every N steps and at the end, and resume from it.

A checkpoint directory (merged by Ray from every rank's local directory) holds::

    deepspeed/latest, deepspeed/<tag>/...   ZeRO shards of params, optimizer and lr schedule (every rank)
    rank<r>.pt                              data-stream position and RNG states of rank r
    trainer.json                            step, MLflow run id, resolved config (rank 0)

Ray keeps the newest `train.keep_checkpoints` and hands the latest back through `ray.train.get_checkpoint()`
when it restarts the worker group or when a run is resubmitted with `--resume`. At the end, rank 0
consolidates the ZeRO shards into an fp32 `EmbeddingModel` directory with DeepSpeed's zero_to_fp32.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemb_dist.config import GembConfig, dump_config
from gemb_dist.data import TrainStream
from gemb_dist.distributed import barrier
from gemb_dist.model import EmbeddingModel
from gemb_dist.train.engine import TrainEngine

DEEPSPEED_DIR = "deepspeed"
TRAINER_FILE = "trainer.json"


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and restores engine + data stream + RNG + step on every rank, through `ray.train.report`."""

    def __init__(self, config: GembConfig, engine: TrainEngine, stream: TrainStream, rank: int):
        self.config = config
        self.engine = engine
        self.stream = stream
        self.rank = rank
        self.last_saved_step: int | None = None

    def restore(self) -> dict[str, Any] | None:
        """Load the latest Ray checkpoint, if there is one; returns rank 0's trainer.json content."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            directory = Path(directory)
            trainer = json.loads((directory / TRAINER_FILE).read_text())
            self.engine.load_checkpoint(directory / DEEPSPEED_DIR, tag=trainer["tag"])
            own = torch.load(directory / f"rank{self.rank}.pt", weights_only=False)
        self.stream.load_state_dict(own["data"])
        self.stream.stats.update(own["stats"])
        set_rng_state(own["rng"])
        self.last_saved_step = trainer["step"]
        return trainer

    def due(self, step: int) -> bool:
        return step % self.config.train.checkpoint_every == 0 and step != self.last_saved_step

    def save(self, step: int, metrics: dict[str, float], extra: dict[str, Any]) -> None:
        """All ranks: write this rank's share and report it; Ray merges the shares into one checkpoint."""
        import ray.train

        tag = f"step{step}"
        with tempfile.TemporaryDirectory(prefix="gemb-ckpt-") as tmp:
            directory = Path(tmp)
            self.engine.save_checkpoint(directory / DEEPSPEED_DIR, tag=tag, client_state={"step": step})
            own = {"data": self.stream.state_dict(), "stats": dict(self.stream.stats), "rng": rng_state()}
            torch.save(own, directory / f"rank{self.rank}.pt")
            if self.rank == 0:
                trainer = {"step": step, "tag": tag, "config": dump_config(self.config), **extra}
                (directory / TRAINER_FILE).write_text(json.dumps(trainer, indent=2) + "\n")
            ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        # report's own barrier precedes the upload; wait until every rank's share is in storage.
        barrier()
        self.last_saved_step = step


def consolidate_checkpoint(checkpoint_dir: str | Path, config: GembConfig, output_dir: str | Path) -> Path:
    """Merge a checkpoint's ZeRO shards into an fp32 model directory that `EmbeddingModel.load` reads."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    trainer = json.loads((checkpoint_dir / TRAINER_FILE).read_text())
    if config.deepspeed.zero_stage == 0:  # no ZeRO shards: the module's weights are whole in the model file
        model_file = checkpoint_dir / DEEPSPEED_DIR / trainer["tag"] / "mp_rank_00_model_states.pt"
        state = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir / DEEPSPEED_DIR), tag=trainer["tag"])
    model = _model_skeleton(config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    # zero_to_fp32 stores one copy of tied weights; the skeleton ties them again itself.
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint_dir}: checkpoint does not match the model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    model.save(output_dir)
    return Path(output_dir)


def _model_skeleton(config: GembConfig) -> EmbeddingModel:
    """The run's model in fp32 on CPU, without ZeRO partitioning, to receive the consolidated weights."""
    from transformers.integrations import deepspeed as hf_deepspeed

    model_config = config.model.model_copy(update={"dtype": "float32"})
    if config.train.init_from:
        model_config = model_config.model_copy(update={"name_or_path": config.train.init_from, "backbone_config": None})
    # One rank builds this alone: with the run's ZeRO-3 config registered, transformers would partition it
    # across ranks (a collective the other ranks never join).
    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        return EmbeddingModel.from_config(model_config)
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    tied = getattr(model.backbone, "_tied_weights_keys", None) or {}
    return name.removeprefix("backbone.") in tied
