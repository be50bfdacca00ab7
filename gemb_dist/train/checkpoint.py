"""Checkpoints through Ray Train: the whole training state every N steps and at the end, restored per rank, no pickle.

A checkpoint directory `<storage>/<run>/checkpoint_step<NNNNNNNN>/` (merged by Ray from every rank's share) holds::

    deepspeed/<tag>/...          DeepSpeed's files: ZeRO shards of params and optimizer per rank, lr schedule
    rank<r>.json                 data-stream position, data counters, Python/NumPy RNG scalars of rank r
    rank<r>.safetensors          torch (and CUDA) RNG states, NumPy's key array of rank r
    trainer.json                 step, tag, world size, MLflow run id, resolved config (rank 0)
    manifest.json                every file and its size; written LAST, by rank 0, once all shares are stored

A checkpoint without `manifest.json` is incomplete and never restored from; one written by an older version
(format 1: `rank<r>.pt`, pickled, no manifest) is refused naming the file and how to carry on. A run restores the
checkpoint Ray Train registered; resuming (`train.resume`) a run of which Ray registered none (stopped or killed
before its controller polled the first report), the newest complete one in the run's storage. On restore each
rank fetches only its own files plus the small shared ones (not the other ranks' optimizer shards), from local
disk or S3, and loads DeepSpeed's `.pt` files with `torch.load(weights_only=True)` (see `SafeTorchCheckpointEngine`).
At the end, rank 0 consolidates the ZeRO shards into an fp32 `EmbeddingModel` directory (`train/consolidate.py`).
"""

from __future__ import annotations

import errno
import json
import logging
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gemb_dist.config import GembConfig, dump_config
from gemb_dist.data import TrainStream
from gemb_dist.distributed import barrier
from gemb_dist.train.consolidate import DEEPSPEED_DIR, TRAINER_FILE
from gemb_dist.train.engine import TrainEngine
from gemb_dist.train.safe_load import SafeTorchCheckpointEngine

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
CHECKPOINT_FORMAT = 2
CHECKPOINT_PREFIX = "checkpoint_step"
# Files that belong to one rank: ours and DeepSpeed's (zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt).
_RANK_FILE = re.compile(r"(?:^|/)(?:rank|(?:bf16_)?zero_pp_rank_)(\d+)[_.]")


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored (incomplete, other world size, damaged); the message names the file."""


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of every RNG a step draws from: Python, NumPy, torch CPU and CUDA."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    meta = {"python": [py_version, list(py_state), py_gauss], "numpy": [np_name, np_pos, np_has_gauss, np_gauss]}
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return meta, tensors


def set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((np_name, tensors["numpy_keys"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(len(tensors)) if f"cuda{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def rank_files(manifest: dict[str, Any], rank: int) -> list[str]:
    """The files of a checkpoint that `rank` needs: its own shares and every file that belongs to no rank."""
    needed = []
    for name in manifest["files"]:
        match = _RANK_FILE.search(name)
        if match is None or int(match.group(1)) == rank:
            needed.append(name)
    return sorted(needed)


class Checkpointer:
    """Saves and restores engine + data stream + RNG + step on every rank, through `ray.train.report`."""

    def __init__(self, config: GembConfig, engine: TrainEngine, stream: TrainStream, rank: int, world_size: int):
        self.config = config
        self.engine = engine
        self.stream = stream
        self.rank = rank
        self.world_size = world_size
        self.last_saved_step: int | None = None
        self.fetched: list[str] = []  # files the last restore fetched (the per-rank restore test reads it)
        SafeTorchCheckpointEngine.install(engine.engine)

    # ---------------------------------------------------------------- restore
    def restore(self) -> dict[str, Any] | None:
        """Load the checkpoint Ray Train registered (or, resuming a run it registered none of, the newest complete
        one in the run's storage), if there is one; returns rank 0's trainer.json content."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            return self.restore_from(checkpoint.filesystem, checkpoint.path)
        if not self.config.train.resume:
            return None
        # Ray Train registers a reported checkpoint only when its controller next polls the workers (every few
        # seconds): a job stopped or killed in between leaves complete checkpoints in storage that Ray does not
        # know. Resuming from scratch would repeat the run's steps and open a second MLflow run under its name.
        storage = ray.train.get_context().get_storage()
        path = newest_stored(storage.storage_filesystem, storage.experiment_fs_path)
        if path is None:
            return None
        log.warning("Ray Train registered no checkpoint of this run; resuming from the newest complete one, %s", path)
        return self.restore_from(storage.storage_filesystem, path)

    def restore_from(self, filesystem, path: str) -> dict[str, Any]:
        """Restore from the checkpoint at `path` on a pyarrow `filesystem` (or, if incomplete, its newest complete
        sibling), fetching only this rank's files."""
        path, manifest = newest_complete(filesystem, path)
        where = f"{path}/{MANIFEST_FILE}"
        if manifest["world_size"] != self.world_size:
            raise CheckpointError(
                f"{where}: checkpoint written by {manifest['world_size']} ranks, this run has {self.world_size} "
                "(ray.num_workers): ZeRO optimizer shards are partitioned per rank and are not re-partitioned; "
                f"resume with ray.num_workers={manifest['world_size']}, or consolidate the checkpoint into a model "
                "and start a new run from it (train.init_from)"
            )
        with tempfile.TemporaryDirectory(prefix="gemb-restore-", dir=self.config.train.checkpoint_staging_dir) as tmp:
            local = Path(tmp)
            self.fetched = fetch_files(filesystem, path, manifest, rank_files(manifest, self.rank), local)
            trainer = json.loads((local / TRAINER_FILE).read_text())
            self.engine.load_checkpoint(local / DEEPSPEED_DIR, tag=trainer["tag"])
            own = json.loads((local / f"rank{self.rank}.json").read_text())
            tensors = load_file(local / f"rank{self.rank}.safetensors")
        self.stream.load_state_dict(own["data"])
        self.stream.stats.update(own["stats"])
        set_rng_state(own["rng"], tensors)
        self.last_saved_step = trainer["step"]
        log.info("rank %d restored step %d from %s (%d files)", self.rank, trainer["step"], path, len(self.fetched))
        return trainer

    # ---------------------------------------------------------------- save
    def due(self, step: int) -> bool:
        return step % self.config.train.checkpoint_every == 0 and step != self.last_saved_step

    def save(self, step: int, metrics: dict[str, float], extra: dict[str, Any]) -> None:
        """All ranks: write this rank's share and report it; Ray merges the shares into one checkpoint directory,
        then rank 0 writes the manifest that makes it complete."""
        import ray.train

        tag = f"step{step}"
        staging = self.config.train.checkpoint_staging_dir
        with tempfile.TemporaryDirectory(prefix="gemb-ckpt-", dir=staging) as tmp:
            try:
                self._write_share(Path(tmp), step, tag, extra)
            except (OSError, RuntimeError) as err:
                raise _write_error(err, step, Path(tmp)) from err
            ray.train.report(
                {**metrics, "step": step},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=checkpoint_dir_name(step),
            )
        # report's own barrier precedes the upload; wait until every rank's share is in storage.
        barrier()
        if self.rank == 0:
            storage = ray.train.get_context().get_storage()
            path = f"{storage.experiment_fs_path}/{checkpoint_dir_name(step)}"
            write_manifest(storage.storage_filesystem, path, step=step, tag=tag, world_size=self.world_size)
        self.last_saved_step = step

    def _write_share(self, directory: Path, step: int, tag: str, extra: dict[str, Any]) -> None:
        self.engine.save_checkpoint(directory / DEEPSPEED_DIR, tag=tag, client_state={"step": step})
        meta, tensors = rng_state()
        own = {"data": self.stream.state_dict(), "stats": dict(self.stream.stats), "rng": meta}
        (directory / f"rank{self.rank}.json").write_text(json.dumps(own) + "\n")
        save_file(tensors, directory / f"rank{self.rank}.safetensors")
        if self.rank == 0:
            trainer = {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "tag": tag,
                "world_size": self.world_size,
                "config": dump_config(self.config),
                **extra,
            }
            (directory / TRAINER_FILE).write_text(json.dumps(trainer, indent=2) + "\n")


def _write_error(err: Exception, step: int, directory: Path) -> OSError:
    """A failed write of a checkpoint share as an OSError naming the directory (torch.save reports a full disk as a
    RuntimeError of its zip writer, DeepSpeed as whatever it got)."""
    free = shutil.disk_usage(directory).free if directory.exists() else 0
    reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
    code = getattr(err, "errno", None) or (errno.ENOSPC if free < 1 << 20 else errno.EIO)
    return OSError(
        code,
        f"checkpoint of step {step}: writing this rank's share under {directory} failed ({reason}; "
        f"{free} bytes free there). The previous checkpoint is intact; free space (or set "
        "train.checkpoint_staging_dir) and resubmit with --resume",
    )


# -------------------------------------------------------------------- manifest and fetching
def write_manifest(filesystem, path: str, *, step: int, tag: str, world_size: int) -> None:
    """List the stored checkpoint at `path`, check every rank's share is there, write manifest.json last."""
    import pyarrow.fs

    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    files = {
        info.path[len(path) + 1 :]: info.size
        for info in infos
        if info.type == pyarrow.fs.FileType.File and not info.path.endswith(MANIFEST_FILE)
    }
    missing = [f"rank{r}.json" for r in range(world_size) if f"rank{r}.json" not in files]
    if TRAINER_FILE not in files or missing:
        raise CheckpointError(f"{path}: checkpoint shares missing after upload: {missing or [TRAINER_FILE]}")
    manifest = {"format": CHECKPOINT_FORMAT, "step": step, "tag": tag, "world_size": world_size, "files": files}
    data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    if filesystem.type_name == "local":  # rename: readers see the whole file or none
        tmp = f"{path}/.{MANIFEST_FILE}.tmp"
        with filesystem.open_output_stream(tmp) as out:
            out.write(data)
        filesystem.move(tmp, f"{path}/{MANIFEST_FILE}")
    else:  # one small S3 PUT: the object appears whole or not at all
        with filesystem.open_output_stream(f"{path}/{MANIFEST_FILE}") as out:
            out.write(data)


def read_manifest(filesystem, path: str) -> dict[str, Any] | None:
    import pyarrow.fs

    where = f"{path}/{MANIFEST_FILE}"
    if filesystem.get_file_info(where).type == pyarrow.fs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(where) as stream:
        try:
            manifest = json.loads(stream.read())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{where}: not valid JSON ({err})") from err
    found = manifest.get("format")
    if found != CHECKPOINT_FORMAT:
        newer = isinstance(found, int) and found > CHECKPOINT_FORMAT
        raise CheckpointError(
            f"{where}: checkpoint format {found!r}, this version of gemb-dist reads format {CHECKPOINT_FORMAT} "
            f"only; {'resume with the newer version that wrote it' if newer else _OLDER_VERSION_ADVICE}"
        )
    return manifest


# Format 1 (before per-rank restore) pickled each rank's data cursor and RNG into rank<r>.pt and wrote no manifest.
_FORMAT1_RANK_FILE = "rank0.pt"
_OLDER_VERSION_ADVICE = (
    "it was written by an older version. Finish that run with the version that wrote it, or start a new run from "
    "its weights: its DeepSpeed shards still consolidate without pickle "
    "(gemb_dist.train.consolidate.consolidate_checkpoint, or a zero_checkpoint ingredient of gemb soup) into a "
    "model directory for train.init_from (the optimizer state and data position are not carried over)"
)


def _refuse_older_format(filesystem, path: str) -> None:
    """A format-1 checkpoint is complete but unreadable here (pickle): say so instead of calling it incomplete."""
    import pyarrow.fs

    where = f"{path}/{_FORMAT1_RANK_FILE}"
    if filesystem.get_file_info(where).type == pyarrow.fs.FileType.File:
        raise CheckpointError(
            f"{where}: checkpoint format 1 (per-rank state pickled in rank<r>.pt, no {MANIFEST_FILE}); this version "
            f"of gemb-dist reads format {CHECKPOINT_FORMAT} only and never unpickles; {_OLDER_VERSION_ADVICE}"
        )


def newest_complete(filesystem, path: str) -> tuple[str, dict[str, Any]]:
    """`path` if its manifest exists, else the newest sibling checkpoint that has one (a crash between Ray
    registering a checkpoint and rank 0 writing its manifest leaves the newest one incomplete)."""
    path = path.rstrip("/")
    manifest = read_manifest(filesystem, path)
    if manifest is not None:
        return path, manifest
    _refuse_older_format(filesystem, path)
    for candidate in _stored_checkpoints(filesystem, path.rsplit("/", 1)[0]):
        if candidate < path and (manifest := read_manifest(filesystem, candidate)) is not None:
            log.warning("checkpoint %s is incomplete (no %s); restoring from %s", path, MANIFEST_FILE, candidate)
            return candidate, manifest
    raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST_FILE}) and no complete one before it")


def newest_stored(filesystem, run_path: str) -> str | None:
    """The newest complete checkpoint directory under the run directory `run_path`, or None if it has none; a
    newest one of the older format is refused, naming its file."""
    stored = _stored_checkpoints(filesystem, run_path.rstrip("/"))
    for candidate in stored:
        if read_manifest(filesystem, candidate) is not None:
            return candidate
    if stored:
        _refuse_older_format(filesystem, stored[0])
    return None


def _stored_checkpoints(filesystem, run_path: str) -> list[str]:
    """The checkpoint directories under `run_path`, newest first (their names sort by step)."""
    import pyarrow.fs

    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(run_path, allow_not_found=True))
    names = (i.path for i in infos if i.type == pyarrow.fs.FileType.Directory)
    return sorted((n for n in names if n.rsplit("/", 1)[-1].startswith(CHECKPOINT_PREFIX)), reverse=True)


def fetch_files(filesystem, path: str, manifest: dict[str, Any], names: list[str], local: Path) -> list[str]:
    """Copy `names` of the checkpoint at `path` into `local`, checking each size against the manifest."""
    import pyarrow.fs

    for name in names:
        target = local / name
        target.parent.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(f"{path}/{name}", str(target), source_filesystem=filesystem)
        if target.stat().st_size != manifest["files"][name]:
            raise CheckpointError(
                f"{path}/{name}: {target.stat().st_size} bytes, the manifest says {manifest['files'][name]}"
            )
    return names
