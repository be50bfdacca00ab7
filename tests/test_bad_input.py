"""Every job entry point and every `gemb` command refuses a misspelled key in its config file, a `--set` of a field
that does not exist and a URL without a scheme before anything runs, naming the field and what is allowed."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gemb_dist.cli import main as gemb
from gemb_dist.train.job import run_job

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
TRACKING_URL = (
    "mlflow.tracking_uri=127.0.0.1:5000",
    "mlflow.tracking_uri: Value error, '127.0.0.1:5000' has no known scheme; use one of http://, https://",
)
LOCATION = "is not a local path, file:// or s3:// URI"


def job_main(name: str) -> Callable[[list[str]], int]:
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@dataclass
class EntryPoint:
    run: Callable[[list[str]], int]
    config: dict  # a valid config file's content
    outputs: Callable[[Path], list[str]]  # --set items pointing every output under a directory
    misspelled: tuple[tuple[str, ...], str]  # (section path, key) renamed in the file, e.g. (("loss",), "temprature")
    unknown: str  # a --set of a field that does not exist
    allowed: str  # the allowed keys the refusal of `unknown` must list
    url: tuple[str, str] | None  # a --set of a URL without a (known) scheme and what the refusal says


def shipped(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def training(stage: str) -> Callable[[list[str]], int]:
    return lambda argv: run_job(stage, argv)


ENTRY_POINTS = {
    "jobs/prefinetune.py": EntryPoint(
        training("prefinetune"), shipped("smoke_cpu.yaml"), lambda out: [f"ray.storage_path={out}"],
        (("loss",), "temprature"), "gradcache.chunk_sise=8",
        "chunk_size, chunk_tokens, enabled, loss_block_size, reduction, zero3_pass1", TRACKING_URL,
    ),
    "jobs/finetune.py": EntryPoint(
        training("finetune"), shipped("finetune_minilm_cpu.yaml"), lambda out: [f"ray.storage_path={out}"],
        (("train",), "init_form"), "data.num_negative=3", "global_batch_size, max_bad_samples, mode, num_negatives",
        ("data.shards=s3:gemb-data/shards", f"data.shards: Value error, 's3:gemb-data/shards' {LOCATION}"),
    ),
    "jobs/evaluate.py": EntryPoint(
        job_main("evaluate"), shipped("evaluate.yaml"), lambda out: [f"out={out}/r.json"],
        ((), "retreival"), "mlflow.experimnt=x", "experiment, flush_timeout_s, request_timeout_s", TRACKING_URL,
    ),
    "jobs/soup.py": EntryPoint(
        job_main("soup"), shipped("soup.yaml"), lambda out: [f"output_dir={out}/soup"],
        (("held_out",), "metirc"), "held_out.batchsize=4", "batch_size, classification, clustering, dim, metric",
        TRACKING_URL,
    ),
    "jobs/build_data.py": EntryPoint(
        job_main("build_data"), shipped("build_data.yaml"), lambda out: [f"output={out}/shards"],
        ((), "samples_per_shards"), "dedup=true", "dedupe, input, memory_gb, num_cpus, output",
        ("output=s3:gemb-data/shards", f"output: Value error, 's3:gemb-data/shards' {LOCATION}"),
    ),
    "jobs/mine_negatives.py": EntryPoint(
        job_main("mine_negatives"), shipped("mine_negatives.yaml"), lambda out: [f"output={out}/mined"],
        (("mining",), "top_kk"), "encoder.num_actor=0", "batch_size, device, num_actors, path",
        ("judge={base_url: 127.0.0.1:8000/v1, model: m}", "base_url '127.0.0.1:8000/v1' must start with http"),
    ),
    "jobs/synthesize.py": EntryPoint(
        job_main("synthesize"), shipped("synthesize.yaml"), lambda out: [f"output={out}/synthetic"],
        (("llm",), "max_token"), "validation.min_word=3", "max_passage_overlap, max_words, min_words",
        ("llm.base_url=localhost:8000/v1", "base_url 'localhost:8000/v1' must start with http"),
    ),
    "gemb eval": EntryPoint(
        lambda argv: gemb(["eval", *argv]), shipped("evaluate.yaml"), lambda out: [f"out={out}/r.json"],
        ((), "batchsize"), "dim=[8]", "batch_size, classification, clustering, device, dims", TRACKING_URL,
    ),
    "gemb data build": EntryPoint(
        lambda argv: gemb(["data", "build", *argv]), shipped("build_data.yaml"), lambda out: [f"output={out}/s"],
        ((), "skip_invalids"), "samples=3", "dedupe, input, memory_gb, num_cpus, output, samples_per_shard",
        ("output=gs://bucket/shards", f"output: Value error, 'gs://bucket/shards' {LOCATION}"),
    ),
    "gemb data audit": EntryPoint(
        lambda argv: gemb(["data", "audit", *argv]), {"world_size": 2, "data": {"shards": "/nonexistent"}},
        lambda out: [], (("data",), "sed"), "worldsize=2", "data, epochs, in_process, resume_after_steps",
        ("data.shards=s3:bucket/shards", f"data.shards: Value error, 's3:bucket/shards' {LOCATION}"),
    ),
    "gemb export": EntryPoint(
        lambda argv: gemb(["export", *argv]), {"model": "/nonexistent", "out": "x"}, lambda out: [f"out={out}/e"],
        ((), "formatt"), "fromat=hf", "format, model, out", None,  # no URL field: paths only
    ),
    "gemb mine": EntryPoint(
        lambda argv: gemb(["mine", *argv]), shipped("mine_negatives.yaml"), lambda out: [f"output={out}/mined"],
        ((), "rerank_dept"), "mining.max_ratio=0.9", "faiss_factory, index, keep_existing_negatives, margin",
        TRACKING_URL,
    ),
    "gemb synthesize": EntryPoint(
        lambda argv: gemb(["synthesize", *argv]), shipped("synthesize.yaml"), lambda out: [f"output={out}/syn"],
        ((), "max_pasages"), "llm.max_token=9", "base_url, cache_path, max_concurrency, max_failed_requests",
        TRACKING_URL,
    ),
    "gemb config show": EntryPoint(
        lambda argv: gemb(["config", "show", *argv]), shipped("smoke_cpu.yaml"), lambda out: [],
        (("deepspeed",), "zero_stag"), "ray.num_worker=2", "max_failures, num_workers, resources_per_worker",
        TRACKING_URL,
    ),
    "gemb plan": EntryPoint(
        lambda argv: gemb(["plan", "--gpus", "8", "--gpu-memory", "80", *argv]), shipped("smoke_cpu.yaml"),
        lambda out: [], (("model",), "mrl_dim"), "optimizer.learning_rate=1", "betas, eps, grad_clip, lr",
        TRACKING_URL,
    ),
}  # fmt: skip


def _case(name: str, tmp_path: Path, config: dict, *sets: str) -> tuple[EntryPoint, list[str]]:
    entry = ENTRY_POINTS[name]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    overrides = [*entry.outputs(tmp_path / "out"), *sets]
    return entry, ["--config", str(tmp_path / "job.yaml"), *(arg for s in overrides for arg in ("--set", s))]


def _refused(entry: EntryPoint, argv: list[str], tmp_path: Path, capsys, *expected: str) -> None:
    import ray

    assert entry.run(argv) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "out").exists(), "nothing may be written before the config is accepted"
    assert not ray.is_initialized(), "the refusal must come before Ray starts"


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_misspelled_key_in_the_config_file(name, tmp_path, capsys):
    entry = ENTRY_POINTS[name]
    config = yaml.safe_load(yaml.safe_dump(entry.config))  # a copy
    path, key = entry.misspelled
    section = config
    for part in path:
        section = section[part]
    section[key] = 1
    field = ".".join([*path, key])
    entry, argv = _case(name, tmp_path, config)
    _refused(entry, argv, tmp_path, capsys, f"{field}: unknown key; allowed keys: ")


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_set_of_a_field_that_does_not_exist(name, tmp_path, capsys):
    entry, argv = _case(name, tmp_path, ENTRY_POINTS[name].config, ENTRY_POINTS[name].unknown)
    field = entry.unknown.partition("=")[0]
    _refused(entry, argv, tmp_path, capsys, f"{field}: unknown key; allowed keys: ", entry.allowed)


@pytest.mark.parametrize("name", sorted(n for n, e in ENTRY_POINTS.items() if e.url))
def test_url_without_a_scheme(name, tmp_path, capsys):
    entry = ENTRY_POINTS[name]
    override, message = entry.url
    entry, argv = _case(name, tmp_path, entry.config, override)
    _refused(entry, argv, tmp_path, capsys, message)
