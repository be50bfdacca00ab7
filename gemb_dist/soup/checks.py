"""Ingredients must be one architecture with the same tensors: checks that name the first file and field or key
that differs, run before any (slow) evaluation or averaging."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gemb_dist.model import BACKBONE_CONFIG_NAME, GEMB_CONFIG_NAME
from gemb_dist.tensor_files import TensorSpec, read_tensor_specs

# Fields of config.json that record where or with which library version a model was saved, not what it is.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash"}


def check_same_tensors(paths: Sequence[str | os.PathLike]) -> list[TensorSpec]:
    """The common tensor specs of all files; ValueError naming the first file and key that differ."""
    reference = read_tensor_specs(paths[0])
    by_key = {s.key: s for s in reference}
    for path in paths[1:]:
        specs = {s.key: s for s in read_tensor_specs(path)}
        for key in sorted(set(by_key) | set(specs)):
            if key not in specs:
                raise ValueError(f"{path}: tensor {key!r} is missing (present in {paths[0]})")
            if key not in by_key:
                raise ValueError(f"{path}: tensor {key!r} is not in {paths[0]}")
            ours, theirs = by_key[key], specs[key]
            if ours.shape != theirs.shape:
                raise ValueError(
                    f"{path}: tensor {key!r} has shape {list(theirs.shape)}, {paths[0]} has {list(ours.shape)}"
                )
            if ours.dtype != theirs.dtype:
                raise ValueError(f"{path}: tensor {key!r} has dtype {theirs.dtype}, {paths[0]} has {ours.dtype}")
    return reference


def _architecture(model_dir: Path) -> dict[str, Any]:
    out = {}
    for name in (BACKBONE_CONFIG_NAME, GEMB_CONFIG_NAME):
        path = model_dir / name
        if not path.is_file():
            raise ValueError(f"{path}: missing; {model_dir} is not a gemb model dir")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
        out.update({f"{name}:{k}": v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS})
    return out


def check_same_architecture(model_dirs: Sequence[Path]) -> None:
    """ValueError naming the first config field where an ingredient differs from the first one."""
    reference = _architecture(model_dirs[0])
    for model_dir in model_dirs[1:]:
        other = _architecture(model_dir)
        for key in sorted(set(reference) | set(other)):
            if reference.get(key, "<absent>") != other.get(key, "<absent>"):
                file, _, name = key.partition(":")
                raise ValueError(
                    f"{model_dir / file}: field {name!r} is {other.get(key, '<absent>')!r} but "
                    f"{model_dirs[0] / file} has {reference.get(key, '<absent>')!r}; "
                    "ingredients must share one architecture"
                )
