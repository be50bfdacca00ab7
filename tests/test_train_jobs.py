"""The job entry points' driver-side checks: everything here fails before Ray or any worker is involved."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from gemb_dist.config import ConfigError, build_config
from gemb_dist.train.job import load_job_config, parse_args
from gemb_dist.train.ray_trainer import default_run_name, prepare_run, resolve_storage_path

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def job_config(stage: str, *argv: str):
    return load_job_config(parse_args(list(argv)), stage)


@pytest.mark.parametrize("name", ["prefinetune", "finetune"])
def test_docstring_starts_with_the_submit_command(name):
    doc = load_job(name).__doc__
    assert "ray job submit --address http://127.0.0.1:8265 --working-dir . --" in doc
    assert f"python jobs/{name}.py --config jobs/configs/<name>.yaml [--set key=value ...]" in doc


def test_finetune_job_refuses_a_prefinetune_config():
    with pytest.raises(ConfigError, match="train.stage"):
        job_config("finetune", "--config", str(JOBS / "configs" / "smoke_cpu.yaml"))


def test_finetune_job_refuses_mixed_task_batches():
    with pytest.raises(ConfigError, match="data.mode"):
        job_config("finetune", "--config", str(JOBS / "configs" / "smoke_cpu.yaml"), "--set", "train.stage=finetune")


def test_finetune_job_accepts_its_config_and_resolves_packaged_models():
    config = job_config("finetune", "--config", str(JOBS / "configs" / "finetune_minilm_cpu.yaml"))
    assert config.train.stage == "finetune" and Path(config.model.name_or_path).is_dir()


def test_resume_needs_a_run_name():
    with pytest.raises(ConfigError, match="train.resume needs train.run_name"):
        job_config("prefinetune", "--config", str(JOBS / "configs" / "smoke_cpu.yaml"), "--resume")
    with pytest.raises(ConfigError, match="train.resume needs train.run_name"):
        job_config("prefinetune", "--config", str(JOBS / "configs" / "smoke_cpu.yaml"), "--set", "train.resume=true")


def test_resume_and_run_name_are_read_from_the_config_and_the_flags_are_aliases(tmp_path):
    smoke = yaml.safe_load((JOBS / "configs" / "smoke_cpu.yaml").read_text())
    smoke["train"] = {**(smoke.get("train") or {}), "resume": True, "run_name": "from-yaml"}
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(smoke))
    from_yaml = job_config("prefinetune", "--config", str(path))
    assert from_yaml.train.resume and from_yaml.train.run_name == "from-yaml"
    smoke_path = str(JOBS / "configs" / "smoke_cpu.yaml")
    from_set = job_config("prefinetune", "--config", smoke_path, "--set", "train.resume=true", "--set",
                          "train.run_name=from-set")  # fmt: skip
    from_flags = job_config("prefinetune", "--config", smoke_path, "--resume", "--run-name", "from-set")
    assert from_set == from_flags and from_set.train.resume and from_set.train.run_name == "from-set"
    assert not job_config("prefinetune", "--config", smoke_path).train.resume


def test_bad_override_names_the_field_path():
    with pytest.raises(ConfigError, match="gradcache.chunk_size"):
        job_config(
            "prefinetune", "--config", str(JOBS / "configs" / "smoke_cpu.yaml"), "--set", "gradcache.chunk_size=0"
        )


def test_default_run_names_are_unique_and_name_the_stage():
    names = {default_run_name("finetune") for _ in range(20)}
    assert len(names) == 20 and all(n.startswith("finetune-") for n in names)


def test_relative_storage_goes_under_the_runs_root(monkeypatch, tmp_path):
    monkeypatch.setenv("GEMB_RUNS_ROOT", str(tmp_path))
    assert resolve_storage_path("runs") == str(tmp_path / "runs")
    assert resolve_storage_path("s3://bucket/runs/") == "s3://bucket/runs"
    with pytest.raises(ValueError, match="ray.storage_path"):
        resolve_storage_path("gs://bucket/runs")


def test_existing_run_needs_resume_and_resume_needs_an_existing_run(tmp_path):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    config = build_config(
        {
            "ray": {"storage_path": str(tmp_path / "runs")},
            "train": {"run_name": "taken"},
            "data": {"shards": str(tmp_path / "no-shards")},
        }
    )
    with pytest.raises(ValueError, match="already exists.*train.resume=true"):
        prepare_run(config)
    resumed = build_config(config.model_dump(), ["train.resume=true"])
    fresh = build_config(resumed.model_dump(), ["train.run_name=new"])
    with pytest.raises(ValueError, match="train.resume: no run named 'new'"):
        prepare_run(fresh)
    with pytest.raises(ValueError, match="manifest not found"):  # data is checked on the driver too
        prepare_run(resumed)
