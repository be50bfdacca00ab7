"""DeepSpeed's checkpoint files read without running pickled code: `torch.load(weights_only=True)` everywhere.

DeepSpeed 0.19 saves its `.pt` files with `torch.save` and loads them with the full unpickler (`weights_only`
off; `TorchCheckpointEngine.load`, `utils/zero_to_fp32.py`): whoever can write the run's storage could run code on
every worker. Its files hold tensors, plain containers and a few small DeepSpeed/Python types; those types are
allow-listed here (`_safe_globals()`) and everything else is refused by torch's weights-only unpickler.
"""

from __future__ import annotations

import contextlib
import pickle
import types
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


def _safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed writes into its checkpoints (found by restoring real ZeRO 1/2/3 checkpoints in
    tests/test_checkpoint_restore.py). `fragment_address` is a two-int dataclass in ZeRO-1/2's parameter slice map."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # Some Python 3.11 builds (Debian bookworm's 3.11.2, the image's) pickle enum members by name, as
    # `getattr(ZeroStageEnum, "weights")`. Allowing `getattr` stays safe: the weights-only unpickler calls only
    # allow-listed callables, so it can read attributes of the allowed types but never call what it reads.
    return [ZeroStageEnum, LossScaler, fragment_address, getattr]


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with a weights-only loader; saving is unchanged."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.loaded: list[str] = []  # every file this engine opened (the per-rank restore test reads it)

    def load(self, path: str, map_location=None):
        self.loaded.append(str(path))
        with torch.serialization.safe_globals(_safe_globals()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as err:  # torch's message does not say which file
                raise pickle.UnpicklingError(f"{path}: {err}") from err

    @classmethod
    def install(cls, ds_engine) -> SafeTorchCheckpointEngine:
        """Replace a DeepSpeed engine's (torch) checkpoint engine by the safe one, keeping its settings."""
        current = ds_engine.checkpoint_engine
        if type(current) is not TorchCheckpointEngine and not isinstance(current, cls):
            raise ValueError(
                f"DeepSpeed checkpoint engine {type(current).__name__} is not the torch one: its loader is not "
                "known to be pickle-free"
            )
        safe = cls.__new__(cls)
        safe.__dict__.update(current.__dict__)
        safe.loaded = []
        ds_engine.checkpoint_engine = safe
        return safe


def safe_zero_to_fp32(checkpoint_dir: str, tag: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """`get_fp32_state_dict_from_zero_checkpoint` with its module's `torch.load` made weights-only."""
    from deepspeed.utils import zero_to_fp32

    with _weights_only_torch(zero_to_fp32):
        state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag, **kwargs)
    return state


@contextlib.contextmanager
def _weights_only_torch(module: types.ModuleType):
    """Within the block, `module.torch.load` forces weights_only=True (only that module's name is rebound)."""

    def load(*args, **kwargs):
        kwargs.pop("weights_only", None)  # zero_to_fp32 turns it off; it is forced on below
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(*args, weights_only=True, **kwargs)

    proxy = types.SimpleNamespace(**{name: getattr(torch, name) for name in dir(torch) if not name.startswith("__")})
    proxy.load = load
    original = module.torch
    module.torch = proxy
    try:
        yield
    finally:
        module.torch = original
