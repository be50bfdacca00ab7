"""The DeepSpeed JSON generated from the typed config, the lr schedule, and the shipped job configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gemb_dist.config import build_config, load_config
from gemb_dist.train.deepspeed_config import build_deepspeed_config
from gemb_dist.train.packaged import resolve_packaged_models
from gemb_dist.train.schedule import build_lr_scheduler, lr_multiplier

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
TRAINING_CONFIGS = [
    "smoke_cpu",
    "prefinetune_minilm_cpu",
    "finetune_minilm_cpu",
    "prefinetune_qwen_gpu",
    "finetune_qwen_gpu",
]


def test_zero3_default_has_one_optimizer_step_per_global_batch():
    config = build_config({"data": {"global_batch_size": 64}, "ray": {"num_workers": 4}})
    ds = build_deepspeed_config(config, world_size=4)
    # The gradient cache drives all backward calls of a batch itself: DeepSpeed must neither rescale the loss
    # by 1/GAS nor wait for more micro-batches before stepping.
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": False}
    assert ds["zero_allow_untested_optimizer"] is True  # the client optimizer is torch AdamW


def test_fields_map_to_deepspeed_keys():
    config = build_config(
        {
            "optimizer": {"grad_clip": None},
            "deepspeed": {
                "zero_stage": 3,
                "precision": "bf16",
                "offload_optimizer": True,
                "offload_params": True,
                "reduce_bucket_size": 1234,
                "overlap_comm": False,
            },
            "ray": {"use_gpu": True, "num_workers": 2},
        }
    )
    ds = build_deepspeed_config(config, world_size=2)
    zero = ds["zero_optimization"]
    assert ds["gradient_clipping"] == 0.0
    assert ds["bf16"] == {"enabled": True}
    assert zero["reduce_bucket_size"] == 1234 and zero["overlap_comm"] is False
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"


def test_stage0_has_no_zero_options():
    ds = build_deepspeed_config(build_config({"deepspeed": {"zero_stage": 0}}), world_size=2)
    assert ds["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize(
    ("deepspeed", "message"),
    [
        ({"zero_stage": 2, "offload_params": True}, "deepspeed.offload_params"),
        ({"zero_stage": 0, "offload_optimizer": True}, "deepspeed.offload_optimizer"),
    ],
)
def test_inconsistent_offload_is_rejected_naming_the_field(deepspeed, message):
    with pytest.raises(ValueError, match=message):
        build_deepspeed_config(build_config({"deepspeed": deepspeed}), world_size=2)


def test_batch_not_divisible_by_ranks_is_rejected():
    with pytest.raises(ValueError, match="data.global_batch_size"):
        build_deepspeed_config(build_config({"data": {"global_batch_size": 10}, "ray": {"num_workers": 2}}), 3)


def test_deepspeed_accepts_the_generated_config():
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeed's own parsing and batch arithmetic (one process: it reads the world size from torch.distributed)
    ds = build_deepspeed_config(build_config({"data": {"global_batch_size": 8}, "ray": {"num_workers": 1}}), 1)
    parsed = DeepSpeedConfig(ds)
    assert parsed.zero_optimization_stage == 3
    assert parsed.gradient_accumulation_steps == 1 and parsed.train_micro_batch_size_per_gpu == 8


def _naive_lr(step, total, warmup, schedule, min_ratio):
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / (total - warmup)
    decay = {"cosine": (1 + math.cos(math.pi * t)) / 2, "linear": 1 - t, "constant": 1.0}[schedule]
    return min_ratio + (1 - min_ratio) * decay if schedule != "constant" else 1.0


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays_to_min_ratio(schedule):
    total, warmup, min_ratio = 20, 4, 0.1
    expected = [_naive_lr(s, total, warmup, schedule, min_ratio) for s in range(total + 1)]
    got = [
        lr_multiplier(s, total_steps=total, warmup_steps=warmup, schedule=schedule, min_lr_ratio=min_ratio)
        for s in range(total + 1)
    ]
    assert got == pytest.approx(expected)
    assert got[0] == pytest.approx(0.25) and got[warmup] == pytest.approx(1.0)
    if schedule != "constant":
        assert got[total] == pytest.approx(min_ratio)


def test_scheduler_drives_the_optimizer_lr():
    config = build_config({"optimizer": {"lr": 0.1, "warmup_steps": 2, "schedule": "linear"}})
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.optimizer.lr)
    scheduler = build_lr_scheduler(optimizer, config.optimizer, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.075, 0.05, 0.025])


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_shipped_configs_validate_and_generate_deepspeed_json(name):
    config = resolve_packaged_models(load_config(CONFIGS / f"{name}.yaml"))
    ds = build_deepspeed_config(config, world_size=config.ray.num_workers)
    assert ds["zero_optimization"]["stage"] == config.deepspeed.zero_stage == 3
    assert config.train.stage in name or name == "smoke_cpu"
    if "gpu" in name:
        assert ds["bf16"]["enabled"] and config.model.mrl_dims == [768, 1536, 3072]
    else:
        assert Path(config.model.tokenizer or config.model.name_or_path).is_dir()  # pkg: resolved to a path


def test_unknown_package_reference_names_the_field():
    config = build_config({"model": {"tokenizer": "pkg:no_such_model_package"}})
    with pytest.raises(ValueError, match="model.tokenizer"):
        resolve_packaged_models(config)


def test_gradient_accumulation_is_fp32_and_zero3_gather_settings_reach_the_json():
    config = build_config(
        {
            "deepspeed": {
                "zero_stage": 3,
                "stage3_param_persistence_threshold": 11,
                "stage3_max_live_parameters": 22,
                "stage3_max_reuse_distance": 33,
                "stage3_prefetch_bucket_size": 44,
            }
        }
    )
    ds = build_deepspeed_config(config, world_size=2)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    zero = ds["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 11 and zero["stage3_max_live_parameters"] == 22
    assert zero["stage3_max_reuse_distance"] == 33 and zero["stage3_prefetch_bucket_size"] == 44


def test_zero3_gather_defaults_are_deepspeeds():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ours = build_deepspeed_config(build_config({}), world_size=2)["zero_optimization"]
    theirs = DeepSpeedZeroConfig(stage=3).model_dump(by_alias=True)
    for key in (
        "stage3_param_persistence_threshold",
        "stage3_max_live_parameters",
        "stage3_max_reuse_distance",
        "stage3_prefetch_bucket_size",
    ):
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize(
    ("sections", "fields"),
    [
        ({"deepspeed": {"zero_stage": 2, "offload_params": True}}, ["deepspeed.offload_params", "zero_stage"]),
        ({"deepspeed": {"zero_stage": 0, "offload_optimizer": True}}, ["deepspeed.offload_optimizer", "zero_stage"]),
        (
            {"deepspeed": {"zero_stage": 1, "precision": "bf16"}, "gradcache": {"reduction": "step"}},
            ["gradcache.reduction=step", "deepspeed.precision=bf16", "gradcache.reduction=chunk"],
        ),
        (
            {"deepspeed": {"zero_stage": 3, "precision": "bf16"}, "gradcache": {"reduction": "step"}},
            ["gradcache.reduction=step", "deepspeed.precision=bf16", "gradcache.reduction=chunk"],
        ),
        ({"deepspeed": {"zero_stage": 0, "precision": "bf16"}}, ["deepspeed.precision=bf16", "deepspeed.zero_stage"]),
        ({"deepspeed": {"zero_stage": 2}, "gradcache": {"zero3_pass1": "gather_once"}}, ["gradcache.zero3_pass1"]),
        (
            {"deepspeed": {"zero_stage": 3, "offload_params": True}, "gradcache": {"zero3_pass1": "gather_once"}},
            ["gradcache.zero3_pass1=gather_once", "deepspeed.offload_params"],
        ),
    ],
)
def test_combinations_deepspeed_cannot_run_are_refused_at_load_naming_the_fields(sections, fields):
    from gemb_dist.config import ConfigError

    with pytest.raises(ConfigError) as err:
        build_config(sections)
    for field in fields:
        assert field in str(err.value)


@pytest.mark.parametrize(
    "sections",
    [
        {"deepspeed": {"zero_stage": 3, "precision": "bf16"}},  # CPU bf16 is allowed: DeepSpeed's CPU accelerator
        {"deepspeed": {"zero_stage": 1, "precision": "bf16"}, "gradcache": {"reduction": "chunk"}},
        {"deepspeed": {"zero_stage": 3}, "gradcache": {"reduction": "step", "zero3_pass1": "gather_once"}},
    ],
)
def test_combinations_deepspeed_can_run_load(sections):
    build_config(sections)
