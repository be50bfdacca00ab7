"""The LLM judge against a test double of an OpenAI-compatible endpoint: fusion, retries, timeouts, cache, errors."""

import socket
import time

import pytest
from _llm_double import LLMDouble, containment, jaccard

from gemb_dist.config import ConfigError, build_config
from gemb_dist.judge import (
    GRADED_RELEVANCE,
    QUERY_LIKELIHOOD,
    JudgeClient,
    JudgeConfig,
    JudgeError,
    reciprocal_rank_fusion,
)

QUERY = "how do python generators yield values"
CANDIDATES = [
    "how do python generators yield values? lazily, to the caller",  # most overlap
    "python generators yield",
    "the weather in paris is mild in spring",  # no overlap
    "how values are yielded by generators in python",
]


def started(llm: LLMDouble, tmp_path, **overrides) -> JudgeClient:
    """A judge past its start-up probe, with the double's counters reset so tests count only their own requests."""
    judge = JudgeClient(make_config(llm, tmp_path, **overrides))
    llm.reset_counts()
    return judge


def make_config(llm: LLMDouble, tmp_path, **overrides) -> JudgeConfig:
    fields = {
        "base_url": llm.base_url,
        "model": llm.model,
        "cache_path": str(tmp_path / "judge.sqlite"),
        "backoff_base_s": 0.01,
        "timeout_s": 5.0,
    }
    fields.update(overrides)
    return JudgeConfig(**fields)


def test_rrf_matches_hand_computed_values():
    # prompt A ranks: c0=1, c1=2, c2=3; prompt B: c2=1, c0=2 (tie at 0.5 with c1 -> both rank 2)
    scores = [[0.9, 0.5, 0.1], [0.5, 0.5, 0.8]]
    fused = reciprocal_rank_fusion(scores, k=60)
    assert fused == pytest.approx([1 / 61 + 1 / 62, 1 / 62 + 1 / 62, 1 / 63 + 1 / 61])
    # an unjudged candidate gets nothing from that prompt, and does not push the others down
    fused = reciprocal_rank_fusion([[None, 0.2, 0.4], [0.3, None, 0.1]], k=1)
    assert fused == pytest.approx([1 / 2, 1 / 3, 1 / 2 + 1 / 3])


def test_candidates_scored_by_both_prompts_and_fused(tmp_path):
    with LLMDouble() as llm:
        judge = started(llm, tmp_path, rrf_k=10)
        (result,) = judge.judge_candidates([(QUERY, CANDIDATES)])
        judge.close()
    graded = [round(3 * containment(QUERY, c)) / 3 for c in CANDIDATES]
    likelihood = [round(100 * jaccard(QUERY, c)) / 100 for c in CANDIDATES]
    assert result.scores["graded_relevance"] == pytest.approx(graded)
    assert result.scores["query_likelihood"] == pytest.approx(likelihood)
    assert result.fused == pytest.approx(reciprocal_rank_fusion([graded, likelihood], k=10))
    assert result.fused_order()[0] == 0 and result.fused_order()[-1] == 2
    assert result.irrelevant == [False, False, True, False]  # only the weather passage is judged irrelevant
    assert llm.num_chat_requests == 2 * len(CANDIDATES)
    metrics = judge.metrics()
    assert metrics["judge/requests"] == 8 and metrics["judge/tokens"] > 0
    assert metrics["judge/prompt_tokens"] + metrics["judge/completion_tokens"] == metrics["judge/tokens"]


@pytest.mark.parametrize("failure", ["429", "500"])
def test_retries_on_rate_limit_and_server_error(tmp_path, failure):
    with LLMDouble() as llm:
        judge = started(llm, tmp_path, max_concurrency=1)
        llm.script([failure, failure])
        verdict = judge.judge_one(GRADED_RELEVANCE, QUERY, CANDIDATES[0])
    assert verdict.status == "ok" and verdict.score == pytest.approx(round(3 * containment(QUERY, CANDIDATES[0])) / 3)
    assert llm.num_chat_requests == 3
    assert judge.chat.counters.retries == 2 and judge.chat.counters.failed == 0


def test_retry_after_header_is_honoured(tmp_path):
    # Retry-After 0 from the double overrides a long exponential backoff
    with LLMDouble() as llm:
        judge = started(llm, tmp_path, backoff_base_s=30.0)
        llm.script(["429"])
        start = time.monotonic()
        assert judge.judge_one(GRADED_RELEVANCE, QUERY, CANDIDATES[1]).status == "ok"
    assert time.monotonic() - start < 5


def test_timeout_is_retried_then_gives_up_as_unjudged(tmp_path):
    with LLMDouble(slow_s=1.5) as llm:
        judge = started(llm, tmp_path, timeout_s=0.3, max_retries=2)
        llm.script(["slow"])
        assert judge.judge_one(GRADED_RELEVANCE, QUERY, CANDIDATES[0]).status == "ok"
        assert judge.chat.counters.timeouts == 1 and judge.chat.counters.retries == 1
        llm.fail_when("weather", "slow")
        verdict = judge.judge_one(GRADED_RELEVANCE, QUERY, CANDIDATES[2])
    assert verdict.score is None and verdict.status == "failed"
    assert judge.chat.counters.timeouts == 4 and judge.chat.counters.failed == 1


def test_too_many_failed_requests_stop_naming_the_url(tmp_path):
    with LLMDouble() as llm:
        judge = started(llm, tmp_path, max_retries=0, max_failed_requests=1)
        llm.fail_when("<query>", "500")
        assert judge.judge_one(GRADED_RELEVANCE, QUERY, CANDIDATES[0]).status == "failed"
        with pytest.raises(JudgeError, match=llm.base_url):
            judge.judge_one(GRADED_RELEVANCE, QUERY, CANDIDATES[1])


def test_cache_survives_restart_with_zero_requests(tmp_path):
    with LLMDouble() as llm:
        first = started(llm, tmp_path)
        before = first.judge_candidates([(QUERY, CANDIDATES)])
        first.close()
        requests_after_first = llm.num_chat_requests
        second = started(llm, tmp_path)  # a new process would see the same file
        after = second.judge_candidates([(QUERY, CANDIDATES)])
        second.close()
    assert requests_after_first == 8
    assert llm.num_chat_requests == 0  # zero chat requests the second time
    assert after[0].fused == before[0].fused and after[0].scores == before[0].scores
    assert second.chat.counters.cache_hits == 8 and second.chat.counters.requests == 0
    # the cache key includes the model: another model is judged afresh
    with LLMDouble(model="other-model") as llm2:
        third = started(llm2, tmp_path, model="other-model")
        third.judge_one(QUERY_LIKELIHOOD, QUERY, CANDIDATES[0])
    assert llm2.num_chat_requests == 1


def test_malformed_answers_are_counted_not_fatal(tmp_path):
    with LLMDouble() as llm:
        judge = started(llm, tmp_path)
        llm.fail_when("weather", "malformed_content")
        llm.fail_when("lazily", "malformed_json")
        (result,) = judge.judge_candidates([(QUERY, CANDIDATES)])
    assert judge.malformed == 4  # two candidates x two prompts
    assert judge.chat.counters.malformed_responses == 2  # the two bodies that were not JSON
    assert result.judged == [False, True, False, True]
    assert result.scores["graded_relevance"][0] is None and result.scores["query_likelihood"][2] is None
    assert not any(result.irrelevant[i] for i in (0, 2))  # unjudged is never taken as irrelevant
    assert result.fused[0] == 0 and result.fused[2] == 0


def test_unreachable_endpoint_fails_at_start_naming_the_url(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(JudgeError, match=f"{url}/chat/completions is unreachable"):
        JudgeClient(JudgeConfig(base_url=url, model="m", timeout_s=2.0))


def test_unknown_model_fails_at_start(tmp_path):
    with LLMDouble(model="served") as llm:
        with pytest.raises(JudgeError, match="does not serve model 'missing'"):
            JudgeClient(make_config(llm, tmp_path, model="missing"))


def test_key_comes_from_the_environment_never_from_config(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="api_key must not be in a config file"):
        build_config({"base_url": "http://x/v1", "model": "m", "api_key": "sk-secret"}, cls=JudgeConfig)
    monkeypatch.setenv("GEMB_TEST_JUDGE_KEY", "sk-from-env")
    with LLMDouble() as llm:
        judge = started(llm, tmp_path, api_key_env="GEMB_TEST_JUDGE_KEY")
        judge.judge_one(GRADED_RELEVANCE, QUERY, CANDIDATES[0])
    assert llm.auth_headers == ["Bearer sk-from-env"]


def test_concurrency_limit_is_respected(tmp_path):
    with LLMDouble(slow_s=0.3) as llm:
        judge = started(llm, tmp_path, max_concurrency=3)
        llm.fail_when("<query>", "slow")  # every request takes 0.3 s, so requests overlap if allowed
        judge.judge_pairs([(QUERY, c) for c in CANDIDATES * 2], GRADED_RELEVANCE)
    assert llm.max_in_flight == 3
