"""The chat client's failure semantics against the OpenAI-compatible test double (a real HTTP server): 4xx are
failures, transport errors are retried, a fatal error cancels queued work, and only well-formed answers are cached
under a key that names the endpoint."""

import sqlite3
import time

import pytest
from _llm_double import LLMDouble

from gemb_dist.judge import GRADED_RELEVANCE, JudgeClient, JudgeConfig
from gemb_dist.llm_client import ChatClient, LLMEndpointConfig, LLMEndpointError

QUERY = "how do python generators yield values"
PASSAGES = [f"python generators yield value number {i}" for i in range(6)]


def config(base_url: str, tmp_path, **overrides) -> JudgeConfig:
    fields = {"base_url": base_url, "model": "double-judge", "cache_path": str(tmp_path / "cache.sqlite")}
    fields.update(backoff_base_s=0.01, timeout_s=5.0)
    fields.update(overrides)
    return JudgeConfig(**fields)


def cached_rows(tmp_path) -> int:
    with sqlite3.connect(tmp_path / "cache.sqlite") as conn:
        return conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]


def test_wrong_path_is_a_404_at_start_naming_the_url_and_the_fix(tmp_path):
    with LLMDouble() as llm:
        wrong = llm.base_url.removesuffix("/v1")  # the usual mistake: the API root without /v1
        with pytest.raises(LLMEndpointError, match=rf"{wrong}/chat/completions refused .*HTTP 404.*/v1"):
            JudgeClient(config(wrong, tmp_path))


def test_wrong_path_without_probe_fails_requests_uncached_then_stops(tmp_path):
    with LLMDouble() as llm:
        wrong = llm.base_url.removesuffix("/v1")
        judge = JudgeClient(config(wrong, tmp_path, probe=False, max_failed_requests=3))
        verdicts = judge.judge_pairs([(QUERY, p) for p in PASSAGES[:3]], GRADED_RELEVANCE)
        assert [v.status for v in verdicts] == ["failed"] * 3  # a 404 is a failure, never a "malformed answer"
        assert judge.chat.counters.failed == 3 and judge.chat.counters.retries == 0  # a 404 is not asked again
        assert judge.malformed == 0 and cached_rows(tmp_path) == 0
        with pytest.raises(LLMEndpointError, match=r"failed 4 requests .*HTTP 404"):
            judge.judge_one(GRADED_RELEVANCE, QUERY, PASSAGES[3])
        judge.close()


def test_rejected_key_is_a_401_at_start_and_a_failure_later(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMB_TEST_KEY", "sk-wrong")
    with LLMDouble(api_key="sk-right") as llm:
        refused = rf"{llm.base_url}/chat/completions refused .*HTTP 401.*GEMB_TEST_KEY"
        with pytest.raises(LLMEndpointError, match=refused):
            JudgeClient(config(llm.base_url, tmp_path, api_key_env="GEMB_TEST_KEY"))
        judge = JudgeClient(config(llm.base_url, tmp_path, api_key_env="GEMB_TEST_KEY", probe=False))
        assert judge.judge_one(GRADED_RELEVANCE, QUERY, PASSAGES[0]).status == "failed"
        assert judge.chat.counters.failed == 1 and cached_rows(tmp_path) == 0
        judge.close()
        monkeypatch.setenv("GEMB_TEST_KEY", "sk-right")
        judge = JudgeClient(config(llm.base_url, tmp_path, api_key_env="GEMB_TEST_KEY"))
        assert judge.judge_one(GRADED_RELEVANCE, QUERY, PASSAGES[0]).status == "ok"
        judge.close()


def test_other_4xx_fails_at_once_without_retry(tmp_path):
    with LLMDouble() as llm:
        judge = JudgeClient(config(llm.base_url, tmp_path))
        llm.reset_counts()
        llm.script(["400"])
        assert judge.judge_one(GRADED_RELEVANCE, QUERY, PASSAGES[0]).status == "failed"
        assert llm.num_chat_requests == 1 and judge.chat.counters.failed == 1
        judge.close()


def test_connection_reset_mid_body_is_retried(tmp_path):
    with LLMDouble() as llm:
        judge = JudgeClient(config(llm.base_url, tmp_path))
        llm.reset_counts()
        llm.script(["reset_mid_body", "reset_mid_body"])
        verdict = judge.judge_one(GRADED_RELEVANCE, QUERY, PASSAGES[0])
        judge.close()
    assert verdict.status == "ok" and llm.num_chat_requests == 3
    assert judge.chat.counters.transport_errors == 2 and judge.chat.counters.retries == 2


def test_fatal_error_cancels_a_thousand_queued_items_within_seconds(tmp_path):
    # Every request answers 500; with 3 retries of 0.2 s+ backoff each, working through the queue would take
    # 1000 / 4 x ~1.5 s = 6 minutes. The first request to exhaust its retries fails the job; everything else stops.
    with LLMDouble() as llm:
        judge = JudgeClient(
            config(llm.base_url, tmp_path, max_concurrency=4, max_retries=3, backoff_base_s=0.2, max_failed_requests=0)
        )
        llm.reset_counts()
        llm.fail_when("<query>", "500")
        start = time.monotonic()
        with pytest.raises(LLMEndpointError, match=r"failed 1 requests .*HTTP 500"):
            judge.judge_pairs([(QUERY, f"passage {i}") for i in range(1000)], GRADED_RELEVANCE)
        elapsed = time.monotonic() - start
        time.sleep(0.5)  # nothing is still being sent after the error was raised
        sent = llm.num_chat_requests
        time.sleep(1.0)
        assert llm.num_chat_requests == sent
        judge.close()
    assert elapsed < 10  # the first item's own retries take ~1.5 s (0.2+0.4+0.8, jitter up to 25 %)
    assert sent <= 4 * 4  # at most the 4 items in flight, each with its 4 attempts; none of the 996 queued


def test_rerun_after_fixing_the_url_sends_fresh_requests(tmp_path):
    pairs = [(QUERY, p) for p in PASSAGES]
    with LLMDouble() as llm:
        wrong = llm.base_url.removesuffix("/v1")
        broken = JudgeClient(config(wrong, tmp_path, probe=False))
        assert all(v.status == "failed" for v in broken.judge_pairs(pairs, GRADED_RELEVANCE))
        broken.close()
        llm.reset_counts()
        fixed = JudgeClient(config(llm.base_url, tmp_path))
        llm.reset_counts()
        verdicts = fixed.judge_pairs(pairs, GRADED_RELEVANCE)
        fixed.close()
    assert all(v.status == "ok" for v in verdicts)
    assert llm.num_chat_requests == len(PASSAGES) and fixed.chat.counters.cache_hits == 0


def test_cache_key_names_the_endpoint_and_malformed_answers_are_not_cached(tmp_path):
    pairs = [(QUERY, p) for p in PASSAGES]
    with LLMDouble() as first, LLMDouble() as second:  # same model name, two endpoints
        judge = JudgeClient(config(first.base_url, tmp_path))
        first.reset_counts()
        first.fail_when("number 0", "malformed_content")
        judge.judge_pairs(pairs, GRADED_RELEVANCE)
        judge.close()
        assert cached_rows(tmp_path) == len(PASSAGES) - 1  # the answer without a score is not kept
        other = JudgeClient(config(second.base_url, tmp_path))
        second.reset_counts()
        other.judge_pairs(pairs, GRADED_RELEVANCE)
        other.close()
        assert second.num_chat_requests == len(PASSAGES) and other.chat.counters.cache_hits == 0
        first.heal()
        again = JudgeClient(config(first.base_url, tmp_path))
        first.reset_counts()
        verdicts = again.judge_pairs(pairs, GRADED_RELEVANCE)
        again.close()
    assert first.num_chat_requests == 1 and first.prompts[0].count("number 0") == 1  # only the malformed one
    assert verdicts[0].status == "ok" and again.chat.counters.cache_hits == len(PASSAGES) - 1


def test_url_without_scheme_is_refused():
    with pytest.raises(ValueError, match="base_url '127.0.0.1:8000/v1' must start with http"):
        LLMEndpointConfig(base_url="127.0.0.1:8000/v1", model="m")


def test_closed_client_refuses_work(tmp_path):
    with LLMDouble() as llm:
        client = ChatClient(LLMEndpointConfig(base_url=llm.base_url, model=llm.model))
        client.close()
        with pytest.raises(LLMEndpointError, match="closed"):
            client.complete("hello", template_version="test/v1")
