"""The DeepSpeed JSON of a run, generated from the typed config (never edited by hand or patched at run time).

One call of the gradient cache is one optimizer step: the cache drives every backward of a global batch itself,
so DeepSpeed sees `gradient_accumulation_steps = 1` (no 1/GAS loss scaling) and the engine marks the micro-step
boundaries itself: every chunk's backward is a micro-step, the last one a boundary (`gradcache.reduction=chunk`),
or all of them are coalesced into one reduction (`step`); see `gemb_dist.train.engine`. Gradients accumulate in
fp32 (`data_types.grad_accum_dtype`) whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any

from gemb_dist.config import GembConfig

# DeepSpeed prints its own progress every N steps; the trainer reports progress itself.
_NEVER_PRINT = 2**31 - 1


def build_deepspeed_config(config: GembConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed config dict for `world_size` data-parallel ranks.

    `train_batch_size` is the global batch in queries; each rank holds `global_batch_size / world_size`.
    """
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    global_batch = config.data.global_batch_size
    if global_batch % world_size:
        raise ValueError(
            f"data.global_batch_size ({global_batch}) must be divisible by the number of ranks ({world_size})"
        )
    ds = config.deepspeed  # combinations DeepSpeed cannot run were refused when the config loaded
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": global_batch // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.optimizer.grad_clip or 0.0,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": False},
        # bf16 chunks summed in a bf16 gradient lose their low bits; ZeRO keeps fp32 accumulation buffers instead.
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_optimization": _zero_section(config),
        # The client optimizer is a plain torch AdamW (no JIT-compiled ops); ZeRO accepts it only when told to.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _NEVER_PRINT,
        "wall_clock_breakdown": False,
    }


def _zero_section(config: GembConfig) -> dict[str, Any]:
    ds = config.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 0:
        return zero
    zero.update(
        overlap_comm=ds.overlap_comm,
        contiguous_gradients=True,
        reduce_bucket_size=ds.reduce_bucket_size,
    )
    if ds.zero_stage < 3:
        zero["allgather_bucket_size"] = ds.reduce_bucket_size
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": config.ray.use_gpu}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = ds.stage3_gather_16bit_weights_on_model_save
        zero["stage3_prefetch_bucket_size"] = ds.stage3_prefetch_bucket_size
        zero["stage3_param_persistence_threshold"] = ds.stage3_param_persistence_threshold
        zero["stage3_max_live_parameters"] = ds.stage3_max_live_parameters
        zero["stage3_max_reuse_distance"] = ds.stage3_max_reuse_distance
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": config.ray.use_gpu}
    return zero
