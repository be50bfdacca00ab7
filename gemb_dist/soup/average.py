"""Weighted parameter averages streamed one tensor key at a time.

Each ingredient file is opened with `safe_open`, the one tensor is read and added into a float64 accumulator, the
file is closed, and the averaged tensor is appended to an output file whose safetensors header was written up
front. Peak memory is therefore about three copies of the largest tensor, whatever the number of ingredients.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from gemb_dist.model import WEIGHTS_NAME, copy_model_files
from gemb_dist.soup.checks import check_same_architecture, check_same_tensors
from gemb_dist.tensor_files import ST_DTYPES, TensorSpec, read_tensor, write_safetensors_streaming


def _averaged_tensors(paths: Sequence[str], specs: Sequence[TensorSpec], weights: Sequence[float]):
    total = math.fsum(weights)
    for spec in specs:
        dtype = ST_DTYPES[spec.dtype]
        if not dtype.is_floating_point:  # integer buffers (e.g. position ids) cannot be averaged: must agree
            first = read_tensor(paths[0], spec.key)
            for path in paths[1:]:
                if not torch.equal(first, read_tensor(path, spec.key)):
                    raise ValueError(f"{path}: integer tensor {spec.key!r} differs from {paths[0]}; cannot average it")
            yield first
            continue
        acc = torch.zeros(spec.shape, dtype=torch.float64)
        for path, weight in zip(paths, weights, strict=True):
            acc += read_tensor(path, spec.key).to(torch.float64).mul_(weight)
        yield acc.div_(total).to(dtype)
        del acc


def average_state_dicts(
    paths: Sequence[str | os.PathLike], weights: Sequence[float] | None, out_path: str | os.PathLike
) -> None:
    """Write sum_i(w_i * t_i) / sum_i(w_i) of every tensor of the safetensors `paths` to `out_path`.

    Sums run in float64 and are cast back to the ingredients' dtype. All files must have the same keys,
    shapes and dtypes (ValueError naming the first mismatch); integer tensors must be identical.
    Memory stays bounded by a few copies of the largest tensor, independent of the number of ingredients.
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("average_state_dicts needs at least one ingredient")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise ValueError(f"{len(weights)} weights for {len(paths)} ingredients")
    if any(not math.isfinite(w) or w < 0 for w in weights) or math.fsum(weights) <= 0:
        raise ValueError(f"weights must be finite, non-negative and sum to a positive number: {weights}")
    specs = check_same_tensors(paths)
    write_safetensors_streaming(out_path, specs, _averaged_tensors(paths, specs, weights))


def average_model_dirs(model_dirs: Sequence[Path], weights: Sequence[float] | None, out_dir: Path) -> None:
    """Write a gemb model dir into the existing `out_dir`: averaged weights, other files from the first dir."""
    check_same_architecture(model_dirs)
    average_state_dicts([d / WEIGHTS_NAME for d in model_dirs], weights, out_dir / WEIGHTS_NAME)
    copy_model_files(model_dirs[0], out_dir)
