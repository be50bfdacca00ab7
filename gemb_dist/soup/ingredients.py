"""An ingredient as a local gemb model dir: a model dir as it is, a ZeRO checkpoint consolidated (one streaming
consolidation, `gemb_dist.train.consolidate`), an MLflow run's model artifact downloaded.

A `zero_checkpoint` is either a checkpoint of a gemb training run (`trainer.json` with the run's config beside
`deepspeed/`), or a bare DeepSpeed save dir (the `save_dir` given to `engine.save_checkpoint`: `latest` and
`<tag>/` folders) with the model's non-weight files (`gemb_config.json`, backbone `config.json`, tokenizer files:
a gemb model dir without `model.safetensors`) in that dir or its parent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from gemb_dist.model import WEIGHTS_NAME
from gemb_dist.soup.config import IngredientConfig
from gemb_dist.train.consolidate import TRAINER_FILE, consolidate_checkpoint, consolidate_deepspeed_dir


def consolidate_zero_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: Path, tag: str | None = None) -> Path:
    """Turn a ZeRO checkpoint of an `EmbeddingModel` into a gemb model dir at `out_dir` (must not exist)."""
    from gemb_dist.config import build_config

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ValueError(f"zero_checkpoint {checkpoint_dir}: directory not found")
    if (checkpoint_dir / TRAINER_FILE).is_file():  # a checkpoint of a gemb training run: it knows its config
        trainer = json.loads((checkpoint_dir / TRAINER_FILE).read_text())
        return consolidate_checkpoint(checkpoint_dir, build_config(yaml.safe_load(trainer["config"])), out_dir)
    return consolidate_deepspeed_dir(checkpoint_dir, out_dir, tag)


def resolve_ingredient(ingredient: IngredientConfig, scratch: Path, index: int, tracking_uri: str | None) -> Path:
    """A local gemb model dir for one ingredient (consolidating or downloading into `scratch` when needed)."""
    if ingredient.path is not None:
        path = Path(ingredient.path)
        if not (path / WEIGHTS_NAME).is_file():
            raise ValueError(f"ingredients[{index}].path: {path / WEIGHTS_NAME} not found; not a gemb model dir")
        return path
    if ingredient.zero_checkpoint is not None:
        return consolidate_zero_checkpoint(ingredient.zero_checkpoint, scratch / f"ingredient-{index}", ingredient.tag)
    import mlflow.artifacts

    dst = scratch / f"ingredient-{index}-download"
    dst.mkdir(parents=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=ingredient.mlflow_run_id,
            artifact_path=ingredient.artifact_path,
            dst_path=str(dst),
            tracking_uri=tracking_uri,
        )
    except Exception as err:  # MLflow raises its own exception types for unknown runs and paths
        raise ValueError(f"ingredients[{index}]: cannot download {ingredient.label}: {err}") from None
    if not (Path(local) / WEIGHTS_NAME).is_file():
        raise ValueError(
            f"ingredients[{index}]: artifact {ingredient.label} is not a gemb model dir (no {WEIGHTS_NAME})"
        )
    return Path(local)
