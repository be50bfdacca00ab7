"""safetensors files one tensor at a time: headers and single tensors read without loading a whole file, and files
written from tensors that arrive one by one, so averaging and consolidation hold a few tensors, never a model."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from gemb_dist.files import atomic_file

ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    key: str
    dtype: str  # safetensors dtype name, e.g. F32
    shape: tuple[int, ...]

    @property
    def num_bytes(self) -> int:
        return math.prod(self.shape) * ST_DTYPES[self.dtype].itemsize


def read_tensor_specs(path: str | os.PathLike) -> list[TensorSpec]:
    """Keys, dtypes and shapes of a safetensors file (header only, no tensor data is read)."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: safetensors file not found")
    with safe_open(str(path), framework="pt") as f:
        specs = []
        for key in sorted(f.keys()):
            part = f.get_slice(key)
            specs.append(TensorSpec(key, part.get_dtype(), tuple(part.get_shape())))
    unknown = [s for s in specs if s.dtype not in ST_DTYPES]
    if unknown:
        raise ValueError(f"{path}: tensor {unknown[0].key!r} has dtype {unknown[0].dtype}, which soups do not support")
    return specs


def read_tensor(path: str | os.PathLike, key: str) -> torch.Tensor:
    """One tensor of a safetensors file."""
    # Open per tensor: a handle kept open keeps every page read so far mapped, so resident memory would grow
    # with the number of files read in turn; closing releases the mapping.
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def write_safetensors_streaming(
    out_path: str | os.PathLike,
    specs: Sequence[TensorSpec],
    tensors: Iterator[torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file (atomically) whose tensors arrive one at a time, in `specs` order.

    `safetensors.torch.save_file` needs every tensor in memory at once; the format is simple enough (8-byte
    little-endian header size, JSON header with byte offsets, raw little-endian data) to write the header from
    the known shapes first and then append each tensor's bytes as it is produced.
    """
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.key] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.num_bytes],
        }
        offset += spec.num_bytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with atomic_file(out_path) as f:  # renamed into place only once complete
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for spec in specs:
            tensor = next(tensors)
            assert DTYPE_NAMES[tensor.dtype] == spec.dtype and tuple(tensor.shape) == spec.shape, spec
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        if next(tensors, None) is not None:
            raise AssertionError("more tensors than specs")
