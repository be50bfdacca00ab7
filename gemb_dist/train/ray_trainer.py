"""Runs a training stage on Ray Train: a TorchTrainer of DeepSpeed workers, from the driver side to the workers.

The driver (`launch`) validates everything it can before any worker starts: the run name against existing runs
(Ray Train silently resumes a run whose name and storage match, so resuming must be asked for), the MLflow
server, the storage path. Each worker (`train_worker`) builds engine, stream, checkpointer and tracker and
hands them to `Trainer`; rank 0 writes the consolidated fp32 model at the end.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gemb_dist.config import GembConfig, build_config

log = logging.getLogger(__name__)

RUNS_ROOT_ENV = "GEMB_RUNS_ROOT"
VERSIONED_PACKAGES = ("gemb-dist", "torch", "deepspeed", "transformers", "ray")
MODEL_DIR = "model"


def default_run_name(stage: str) -> str:
    """`<stage>-<YYYYmmdd-HHMMSS>-<random>`: unique, so a new run never lands on an old run's storage."""
    return f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def resolve_storage_path(storage_path: str) -> str:
    """s3:// stays as is; a relative local path is taken under $GEMB_RUNS_ROOT (default: the home directory),
    because `ray job submit --working-dir` runs the driver inside a temporary copy of the working directory."""
    if "://" in storage_path:
        if not storage_path.startswith(("s3://", "file://")):
            raise ValueError(f"ray.storage_path must be a local directory, file:// or s3:// URI, got {storage_path!r}")
        return storage_path.rstrip("/")
    path = Path(storage_path).expanduser()
    if not path.is_absolute():
        path = Path(os.environ.get(RUNS_ROOT_ENV, Path.home())).expanduser() / path
    return str(path.resolve())


def _run_exists(storage: str, run_name: str) -> bool:
    import pyarrow.fs

    from gemb_dist.data.storage import pyarrow_filesystem

    filesystem, root = pyarrow_filesystem(storage)
    info = filesystem.get_file_info(f"{root.rstrip('/')}/{run_name}")
    return info.type != pyarrow.fs.FileType.NotFound


def local_run_dir(storage: str, run_name: str) -> Path:
    """Per-run files the workers write beside the checkpoints (sample log, sqlite MLflow store, fault markers)."""
    if "://" not in storage or storage.startswith("file://"):
        return Path(storage.removeprefix("file://")) / run_name
    return Path(tempfile.gettempdir()) / "gemb-runs" / run_name


@dataclass(frozen=True)
class PreparedRun:
    config: GembConfig  # with train.run_name and mlflow.tracking_uri filled in
    storage: str
    run_dir: Path
    local_tracking: bool = False  # no server configured: MLflow logs to a sqlite file under run_dir


def prepare_run(config: GembConfig) -> PreparedRun:
    """Name the run and check storage, data and MLflow; every failure here happens before any worker starts.

    `train.resume` decides between continuing the run `train.run_name` and starting a fresh one."""
    from gemb_dist.data.manifest import load_manifest
    from gemb_dist.data.mixture import check_mixture
    from gemb_dist.data.storage import Storage, check_s3_location
    from gemb_dist.train.tracking import configured_tracking_uri, probe_tracking_server, resolve_tracking_uri

    storage = resolve_storage_path(config.ray.storage_path)
    check_s3_location(storage, "ray.storage_path")
    check_s3_location(config.data.shards, "data.shards")
    resume = config.train.resume
    run_name = config.train.run_name or default_run_name(config.train.stage)
    exists = _run_exists(storage, run_name)
    if resume and not exists:
        raise ValueError(f"train.resume: no run named {run_name!r} under ray.storage_path {storage}")
    if exists and not resume:
        raise ValueError(
            f"run {run_name!r} already exists under ray.storage_path {storage}; set train.resume=true (--resume) "
            "to continue it, or drop train.run_name (--run-name) for a fresh, uniquely named run"
        )
    check_mixture(config.data, load_manifest(Storage(config.data.shards)), config.data.shards)
    run_dir = local_run_dir(storage, run_name)
    # Resolved here, on the driver, and forwarded in the config: a worker on another node may not share the
    # driver's environment ($MLFLOW_TRACKING_URI), and all ranks must log to the one store the user looks at.
    tracking_uri = resolve_tracking_uri(config.mlflow, run_dir)
    probe_tracking_server(tracking_uri)
    train = config.train.model_copy(update={"run_name": run_name})
    mlflow = config.mlflow.model_copy(update={"tracking_uri": tracking_uri})
    prepared = config.model_copy(update={"train": train, "mlflow": mlflow})
    fallback = configured_tracking_uri(config.mlflow) is None
    return PreparedRun(prepared, storage, run_dir, local_tracking=fallback)


def launch(run: PreparedRun):
    """Train a prepared run on the Ray cluster (the job's, `ray.address`, or a local one); returns the Ray Result."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config, storage, run_dir = run.config, run.storage, run.run_dir
    if not ray.is_initialized():
        ray.init(address=config.ray.address)
    check_node_versions()
    resources = dict(config.ray.resources_per_worker)
    filesystem, storage_path = None, storage
    if storage.startswith("s3://"):  # Ray Train writes checkpoints through it: S3 retries with backoff
        from gemb_dist.data.storage import pyarrow_filesystem

        filesystem, storage_path = pyarrow_filesystem(storage)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "run_dir": str(run_dir)},
        torch_config=TorchConfig(backend="nccl" if config.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=config.ray.num_workers, use_gpu=config.ray.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=config.train.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.ray.max_failures),
        ),
    )
    log.info("run %s: storage %s/%s", config.train.run_name, storage, config.train.run_name)
    return trainer.fit()


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build the parts, restore the latest checkpoint if any, train, export the model."""
    import ray.train

    from gemb_dist.data import build_train_stream
    from gemb_dist.train.checkpoint import Checkpointer
    from gemb_dist.train.engine import TrainEngine, init_deepspeed_distributed, load_model
    from gemb_dist.train.loop import Trainer, planned_steps
    from gemb_dist.train.tracking import build_tracker, lineage_tags

    config: GembConfig = build_config(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if config.ray.use_gpu:
        torch.cuda.set_device(ray.train.torch.get_device())
    else:
        torch.set_num_threads(max(1, int(config.ray.resources_per_worker.get("CPU", 1))))
    init_deepspeed_distributed(config.ray.use_gpu, context.get_local_rank())
    _record_placement(run_dir, rank)

    loaded = load_model(config, world_size)
    stream = build_train_stream(config.data, config.model, loaded.model.tokenizer, rank=rank, world_size=world_size)
    total_steps = planned_steps(config, stream.steps_per_epoch)
    engine = TrainEngine(config, loaded, total_steps, world_size)
    checkpointer = Checkpointer(config, engine, stream, rank, world_size)
    restored = checkpointer.restore() or {}
    tags = lineage_tags(config.train.stage, stream.dataset.manifest.fingerprint)
    tracker = build_tracker(
        config,
        rank=rank,
        run_dir=run_dir,
        run_name=config.train.run_name,
        tags=tags,
        resume_run_id=restored.get("mlflow_run_id"),
    )
    status = "FAILED"
    try:
        trainer = Trainer(
            config,
            engine,
            stream,
            checkpointer,
            tracker,
            rank=rank,
            run_dir=run_dir,
            total_steps=total_steps,
            start_step=restored.get("step", 0),
            logged_through=_last_logged_step(config, tracker.run_id) if restored and rank == 0 else 0,
        )
        trainer.train()
        if rank == 0:
            tracker.log_artifact(export_final_model(config, run_dir), MODEL_DIR)
        status = "FINISHED"
    finally:
        tracker.close(status)


def _record_placement(run_dir: Path, rank: int) -> None:
    """Append which node and PID this rank runs on (one line per attempt): the drills and a post-mortem read it."""
    import json

    import ray

    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "time": time.time()}
    with (run_dir / "nodes.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def _last_logged_step(config: GembConfig, run_id: str | None) -> int:
    """The last step whose `loss` the MLflow run holds (0 if unknown): what an earlier attempt delivered."""
    if run_id is None:
        return 0
    from mlflow import MlflowClient

    try:
        history = MlflowClient(config.mlflow.tracking_uri).get_metric_history(run_id, "loss")
    except Exception as err:  # the server may be down right now: then replayed steps may be logged again
        log.warning(
            "could not read the logged steps of MLflow run %s (%s); replayed steps are logged again", run_id, err
        )
        return 0
    return max((m.step for m in history), default=0)


def check_node_versions() -> None:
    """Every alive node must run the driver's versions of the packages a worker imports; a node that joined with
    other versions would fail (or silently differ) in the middle of a run, so the job fails now, naming it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    mine = package_versions()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    probe = ray.remote(num_cpus=0)(package_versions)
    refs = {
        n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in nodes
    }
    bad = []
    for node in nodes:
        theirs = ray.get(refs[node["NodeID"]], timeout=120)
        diff = {k: f"{theirs.get(k)} (driver {v})" for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            bad.append(f"node {node['NodeID'][:12]} at {node['NodeManagerAddress']}: {diff}")
    if bad:
        raise ValueError("nodes run other package versions than the job's driver: " + "; ".join(bad))


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that must match across nodes (distribution metadata on sys.path)."""
    import importlib.metadata

    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def export_final_model(config: GembConfig, run_dir: Path) -> Path:
    """Rank 0: consolidate the latest checkpoint into `<storage>/<run>/model` (fp32 safetensors)."""
    import ray.train

    from gemb_dist.train.consolidate import consolidate_checkpoint

    storage = resolve_storage_path(config.ray.storage_path)
    with ray.train.get_checkpoint().as_directory() as checkpoint_dir:
        if "://" not in storage or storage.startswith("file://"):
            target = run_dir / MODEL_DIR
            consolidate_checkpoint(checkpoint_dir, config, target)
            return target
        local = Path(tempfile.mkdtemp(prefix="gemb-model-")) / MODEL_DIR
        consolidate_checkpoint(checkpoint_dir, config, local)
    _upload_dir(local, f"{storage}/{config.train.run_name}/{MODEL_DIR}")
    return local


def _upload_dir(local: Path, uri: str) -> None:
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    pyarrow.fs.copy_files(str(local), path, destination_filesystem=filesystem)
    log.info("final model uploaded to %s", uri)
