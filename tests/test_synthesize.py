"""Synthetic data generation against a test double of an OpenAI-compatible endpoint."""

import json
import socket

import pytest
from _llm_double import WORD, LLMDouble

from gemb_dist.config import ConfigError, build_config
from gemb_dist.llm_client import LLMEndpointConfig, LLMEndpointError
from gemb_dist.mining_pipeline import read_samples
from gemb_dist.synthesize import REPORT_NAME, SynthesisTask, SynthesizeJobConfig, run_synthesis

PASSAGES = [
    "The heapq module implements a priority queue where the smallest element is always popped first.",
    "A tar archive stores many files one after another, each preceded by a header with its name and size.",
    "SQLite keeps a complete relational database, tables and indexes included, in one ordinary disk file.",
]


def job_config(llm: LLMDouble, tmp_path, output: str, **fields) -> SynthesizeJobConfig:
    (tmp_path / "passages.txt").write_text("\n".join(PASSAGES + PASSAGES[:1]) + "\n")  # one duplicate passage
    raw = {
        "input": str(tmp_path / "passages.txt"),
        "output": str(tmp_path / output),
        "llm": {"base_url": llm.base_url, "model": llm.model, "max_tokens": 256, "backoff_base_s": 0.01,
                "cache_path": str(tmp_path / "cache.sqlite")},
        "tasks": [
            {"name": "synthetic_retrieval", "kind": "retrieval", "num_per_passage": 3},
            {"name": "synthetic_counterfactual", "kind": "classification", "num_per_passage": 2,
             "labels": ["label0", "label1"]},
        ],
        "samples_per_shard": 4,
        **fields,
    }  # fmt: skip
    return build_config(raw, cls=SynthesizeJobConfig)


def test_generates_validated_deduplicated_shards_tagged_synthetic(tmp_path):
    with LLMDouble() as llm:
        report = run_synthesis(job_config(llm, tmp_path, "out"))
        # the repeated passage is asked about once; one more request is the start-up probe
        assert llm.num_chat_requests == 2 * len(PASSAGES) + 1
    samples = read_samples(str(tmp_path / "out"))
    assert len(samples) == report["num_samples"] > 0
    assert all("synthetic" in s["task"] and s["id"].startswith("synthetic-") for s in samples)
    retrieval = [s for s in samples if s["task"] == "synthetic_retrieval"]
    # the double answers "query about <word i> <word i+1>" for i < 3: each becomes a query for its passage
    for passage in PASSAGES:
        words = WORD.findall(passage)
        expected = [f"query about {words[i]} {words[i + 1]}" for i in range(3)]
        assert [s["query"] for s in retrieval if s["positive"] == passage] == expected
    classification = [s for s in samples if s["task"] == "synthetic_counterfactual"]
    assert {s["positive"] for s in classification} == {"label0", "label1"}
    assert all(s["negatives"] == [{"label0": "label1", "label1": "label0"}[s["positive"]]] for s in classification)
    saved = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert saved["tasks"]["synthetic_retrieval"]["written"] == len(retrieval)
    assert saved["llm"]["requests"] == 6 and saved["llm"]["tokens"] > 0


def test_malformed_answers_and_invalid_items_are_counted(tmp_path):
    def generator(prompt: str) -> str:
        if "tar archive" in prompt:
            return "Sure! Here are some queries: none."  # no JSON array
        if "label" in prompt:
            return json.dumps([{"text": "if only it were faster", "label": "label0"},
                               {"text": "it is fast", "label": "unknown"}])  # fmt: skip
        return json.dumps(["what does heapq pop first", "What does heapq pop first?", "x", 42])

    with LLMDouble(generator=generator) as llm:
        llm.fail_when("SQLite", "malformed_json")
        report = run_synthesis(job_config(llm, tmp_path, "out"))
    retrieval = report["tasks"]["synthetic_retrieval"]
    assert retrieval["malformed_answers"] == 2  # tar (no array) and SQLite (body not JSON)
    assert retrieval["written"] == 1 and retrieval["rejected_duplicate"] == 1
    assert retrieval["rejected_length"] == 1 and retrieval["rejected_not_a_string"] == 1
    counterfactual = report["tasks"]["synthetic_counterfactual"]
    assert counterfactual["rejected_bad_label"] == 1 and counterfactual["written"] == 1
    assert report["llm"]["malformed_responses"] == 2  # the SQLite passage, once per task


def test_rerun_is_served_from_the_cache(tmp_path):
    with LLMDouble() as llm:
        run_synthesis(job_config(llm, tmp_path, "first"))
        first_requests = llm.num_chat_requests
        report = run_synthesis(job_config(llm, tmp_path, "second"))
    # the second run sends only its start-up probe (never cached: it checks that the endpoint answers now)
    assert llm.num_chat_requests == first_requests + 1 and report["llm"]["cache_hits"] == first_requests - 1
    assert read_samples(str(tmp_path / "first")) == read_samples(str(tmp_path / "second"))


def test_unreachable_endpoint_fails_at_start_naming_the_url(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with LLMDouble() as llm:
        config = job_config(llm, tmp_path, "out")
    config.llm = LLMEndpointConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout_s=2)
    with pytest.raises(LLMEndpointError, match=f"http://127.0.0.1:{port}/v1/chat/completions is unreachable"):
        run_synthesis(config)
    assert not (tmp_path / "out").exists()


def test_task_names_must_say_synthetic():
    with pytest.raises(ConfigError, match="must contain 'synthetic'"):
        SynthesisTask.model_validate({"name": "retrieval"}) if False else build_config(
            {"name": "qa"}, cls=SynthesisTask
        )
