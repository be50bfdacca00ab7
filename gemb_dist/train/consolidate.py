"""One streaming consolidation of DeepSpeed checkpoints (ZeRO 0-3) into gemb model directories, used by training
(the final `<run>/model`) and by soups (a `zero_checkpoint` ingredient).

Parameters are read through DeepSpeed's zero_to_fp32 in lazy mode with weights-only loads, and written one tensor
at a time: memory holds the shards' flat fp32 groups and one merged tensor, never a second copy of the model.
The trained `EmbeddingModel`'s names (`backbone.<name>`, `projection.*`) become a saved model dir's (`<name>`,
`projection.*`). No base weights are read: a training run's non-weight files (config.json, gemb_config.json,
tokenizer) are written from its config by a weightless model (`EmbeddingModel.without_weights`); a bare
DeepSpeed save dir needs them saved beside it.

Dtype rule: floating tensors are written in the dtype that the written gemb_config.json declares.
- A training run's checkpoint declares float32: the fp32 master weights, unrounded, whatever `model.dtype` the
  run computed in (`EmbeddingModel.load(dir, dtype="bfloat16")` casts on load).
- A bare save dir declares what the gemb_config.json beside it says, so it averages with that model's dirs.
Integer and boolean buffers keep their dtype.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gemb_dist.config import GembConfig
from gemb_dist.files import atomic_dir
from gemb_dist.model import GEMB_CONFIG_NAME, PROJECTION_KEYS, WEIGHTS_NAME, EmbeddingModel, copy_model_files
from gemb_dist.tensor_files import DTYPE_NAMES, TensorSpec, write_safetensors_streaming
from gemb_dist.train.safe_load import SafeTorchCheckpointEngine, safe_zero_to_fp32

DEEPSPEED_DIR = "deepspeed"  # where a training checkpoint keeps DeepSpeed's files
TRAINER_FILE = "trainer.json"  # a training checkpoint's step, tag and resolved config
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def consolidate_checkpoint(checkpoint_dir: str | Path, config: GembConfig, output_dir: str | Path) -> Path:
    """A training run's checkpoint (`deepspeed/` + `trainer.json`) -> an fp32 model dir at `output_dir` (atomic)."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = json.loads((checkpoint_dir / TRAINER_FILE).read_text())["tag"]
    model = EmbeddingModel.without_weights(final_model_config(config))
    state = zero_state(checkpoint_dir / DEEPSPEED_DIR, tag, config.deepspeed.zero_stage)
    with atomic_dir(output_dir) as tmp:
        write_weights(state, tmp / WEIGHTS_NAME, torch.float32, checkpoint_dir, expected=model)
        model.write_model_files(tmp)
    return Path(output_dir)


def consolidate_deepspeed_dir(save_dir: str | Path, output_dir: Path, tag: str | None = None) -> Path:
    """A bare DeepSpeed save dir of an `EmbeddingModel` (`latest` and `<tag>/`, the model's non-weight files in it
    or its parent) -> a model dir at `output_dir`, which must not exist."""
    save_dir = Path(save_dir)
    source = next((d for d in (save_dir, save_dir.parent) if (d / GEMB_CONFIG_NAME).is_file()), None)
    if source is None:
        raise ValueError(
            f"zero_checkpoint {save_dir}: no {GEMB_CONFIG_NAME} in it or its parent; the model's config.json, "
            f"{GEMB_CONFIG_NAME} and tokenizer files must be saved next to the checkpoint"
        )
    dtype = _DTYPES[json.loads((source / GEMB_CONFIG_NAME).read_text()).get("dtype", "float32")]
    state = zero_state(save_dir, tag)
    output_dir.mkdir(parents=True)
    write_weights(state, output_dir / WEIGHTS_NAME, dtype, save_dir)
    copy_model_files(source, output_dir)
    return output_dir


def final_model_config(config: GembConfig):
    """The ModelConfig of a run's consolidated model: the run's, started from `train.init_from` when set, fp32."""
    model_config = config.model.model_copy(update={"dtype": "float32"})
    if config.train.init_from:
        model_config = model_config.model_copy(update={"name_or_path": config.train.init_from, "backbone_config": None})
    return model_config


def zero_state(deepspeed_dir: Path, tag: str | None, zero_stage: int | None = None) -> Mapping[str, Any]:
    """The module's tensors by the trained model's names: lazy tensors (`.contiguous()` merges one) under ZeRO 1-3,
    the model-states file's module dict under ZeRO-0 (whose weights are whole in that one file)."""
    if zero_stage != 0:
        return safe_zero_to_fp32(str(deepspeed_dir), tag=tag, lazy_mode=True)  # weights-only torch.load
    tag = tag or (deepspeed_dir / "latest").read_text().strip()
    model_file = deepspeed_dir / tag / "mp_rank_00_model_states.pt"
    return SafeTorchCheckpointEngine().load(str(model_file), map_location="cpu")["module"]


def write_weights(
    state: Mapping[str, Any], path: Path, dtype: torch.dtype, where: Path, expected: EmbeddingModel | None = None
) -> None:
    """Stream `state` into the safetensors file `path` under saved-model names, floating tensors cast to `dtype`.
    With `expected` (a weightless model), names and shapes must match its state exactly (ValueError naming
    the checkpoint `where` otherwise)."""
    names = {name: _saved_name(name, where) for name in state}
    if expected is not None:
        _check_matches(state, expected, where)
    order = sorted(names, key=names.get)

    def spec(name: str) -> TensorSpec:
        floating = state[name].dtype.is_floating_point
        return TensorSpec(names[name], DTYPE_NAMES[dtype if floating else state[name].dtype], tuple(state[name].shape))

    def tensors():
        for name in order:
            tensor = state[name].contiguous()  # a lazy ZeRO tensor is merged here, one at a time
            yield tensor.to(dtype) if tensor.dtype.is_floating_point else tensor

    write_safetensors_streaming(path, [spec(name) for name in order], tensors())


def _saved_name(name: str, where: Path) -> str:
    if name.startswith("backbone."):
        return name.removeprefix("backbone.")
    if name in PROJECTION_KEYS:
        return name
    raise ValueError(f"{where}: parameter {name!r} is not part of an EmbeddingModel")


def _check_matches(state: Mapping[str, Any], model: EmbeddingModel, where: Path) -> None:
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    tied = getattr(model.backbone, "_tied_weights_keys", None) or {}
    # zero_to_fp32 may store one copy of tied weights; the model they load into ties them again.
    missing = [k for k in expected if k not in state and k.removeprefix("backbone.") not in tied]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in state if k in expected and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{where}: checkpoint does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"other shape {reshaped[:5]})"
        )
