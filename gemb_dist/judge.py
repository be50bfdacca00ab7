"""An LLM relevance judge over any OpenAI-compatible chat-completions endpoint (vLLM, TGI, hosted APIs).

Two scoring prompts, graded relevance and a query-likelihood style prompt, each rank a query's candidates;
reciprocal rank fusion combines the two rankings. Transport, retries, the on-disk cache (keyed by endpoint, whole
request and prompt version; only answers holding a score are cached) and the counters are
`gemb_dist.llm_client.ChatClient`'s.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field, model_validator

from gemb_dist.llm_client import ChatClient, LLMEndpointConfig, LLMEndpointError

JudgeError = LLMEndpointError  # the judge's endpoint errors name the URL like every LLM endpoint error


@dataclass(frozen=True)
class ScoringPrompt:
    """A prompt asking for an integer in [0, max_score]; higher means more relevant."""

    name: str
    template: str  # placeholders {query} and {passage}
    max_score: int
    version: int = 1  # bump when the way an answer is read changes without the template text changing

    @property
    def template_version(self) -> str:
        return f"judge/{self.name}/v{self.version}"


GRADED_RELEVANCE = ScoringPrompt(
    name="graded_relevance",
    template=(
        "You judge search results.\n<query>{query}</query>\n<passage>{passage}</passage>\n"
        "How relevant is the passage to the query, on a scale from 0 to 3? "
        "3 = it fully answers the query, 2 = highly relevant, 1 = on the topic but does not answer it, "
        "0 = irrelevant. Reply with the digit only."
    ),
    max_score=3,
)
QUERY_LIKELIHOOD = ScoringPrompt(
    name="query_likelihood",
    template=(
        "<passage>{passage}</passage>\nA user looking for exactly this passage typed a search query.\n"
        "<query>{query}</query>\nHow likely is it that this is the query they typed, on a scale from 0 to 100? "
        "0 = impossible, 100 = certain. Reply with the integer only."
    ),
    max_score=100,
)
SCORING_PROMPTS = {p.name: p for p in (GRADED_RELEVANCE, QUERY_LIKELIHOOD)}


class JudgeConfig(LLMEndpointConfig):
    prompts: list[str] = Field(
        ["graded_relevance", "query_likelihood"], description="Scoring prompts fused by RRF (names)."
    )
    rrf_k: int = Field(60, ge=0, description="Reciprocal rank fusion constant: score = sum 1 / (rrf_k + rank).")
    irrelevant_threshold: float = Field(
        0.34,
        ge=0,
        le=1,
        description="A candidate is judged irrelevant when every prompt that judged it gave at most this "
        "fraction of its scale (graded 0-3: grades 0 and 1).",
    )

    @model_validator(mode="after")
    def _check_prompts(self) -> JudgeConfig:
        unknown = [p for p in self.prompts if p not in SCORING_PROMPTS]
        if unknown or not self.prompts:
            raise ValueError(f"judge.prompts {self.prompts} must be a non-empty subset of {sorted(SCORING_PROMPTS)}")
        return self


@dataclass
class Judgment:
    """One prompt's verdict on one (query, passage); `score` is None when unjudged (malformed or failed)."""

    score: float | None  # normalised to [0, 1]
    status: str  # ok | malformed | failed


@dataclass
class FusedJudgments:
    """The judged candidates of one query: per-prompt normalised scores and the RRF fused score."""

    scores: dict[str, list[float | None]]  # prompt -> [N]
    fused: list[float]  # [N], 0 for candidates no prompt judged
    judged: list[bool]  # [N] at least one prompt judged it
    irrelevant: list[bool]  # [N] judged and every verdict at or under the threshold

    def fused_order(self) -> list[int]:
        """Candidate indices by fused score, best first; ties keep the input order."""
        return sorted(range(len(self.fused)), key=lambda i: -self.fused[i])


def reciprocal_rank_fusion(scores_per_prompt: Sequence[Sequence[float | None]], k: int = 60) -> list[float]:
    """Fuse rankings: each prompt ranks its judged candidates by descending score (rank 1 = best, ties share the
    best rank of the tie); a candidate's fused score is the sum over prompts of 1 / (k + rank). Unjudged (None)
    candidates get nothing from that prompt."""
    num = len(scores_per_prompt[0]) if scores_per_prompt else 0
    fused = [0.0] * num
    for scores in scores_per_prompt:
        assert len(scores) == num, "every prompt scores the same candidates"
        judged = [s for s in scores if s is not None]
        for i, s in enumerate(scores):
            if s is not None:
                rank = 1 + sum(1 for other in judged if other > s)
                fused[i] += 1.0 / (k + rank)
    return fused


def parse_score(content: str, max_score: int) -> float | None:
    """The first integer in the answer, normalised by `max_score`; None when absent or out of range."""
    match = re.search(r"-?\d+(?:\.\d+)?", content or "")
    if match is None:
        return None
    value = float(match.group())
    if not 0 <= value <= max_score:
        return None
    return value / max_score


class JudgeClient:
    """Scores (query, passage) pairs with the configured prompts. Construct it at job start: an unusable endpoint
    fails there, naming its URL. A malformed answer (no score in range) is an unjudged verdict, counted in
    `malformed` and not cached; a failed request is an unjudged verdict counted by the chat client."""

    def __init__(self, config: JudgeConfig):
        self.config = config
        self.prompts = [SCORING_PROMPTS[name] for name in config.prompts]
        self.chat = ChatClient(config)
        self.malformed = 0  # answers that were not a chat completion or held no score in range
        self._lock = threading.Lock()

    def judge_one(self, prompt: ScoringPrompt, query: str, passage: str) -> Judgment:
        completion = self.chat.complete(
            prompt.template.format(query=query, passage=passage),
            template_version=prompt.template_version,
            well_formed=lambda content: parse_score(content, prompt.max_score) is not None,
        )
        if completion.status == "failed":
            return Judgment(score=None, status="failed")
        score = parse_score(completion.content, prompt.max_score) if completion.status == "ok" else None
        if score is None:
            with self._lock:
                self.malformed += 1
            return Judgment(score=None, status="malformed")
        return Judgment(score=score, status="ok")

    def judge_pairs(self, pairs: Sequence[tuple[str, str]], prompt: ScoringPrompt) -> list[Judgment]:
        """Verdicts of one prompt on many (query, passage) pairs, `max_concurrency` requests at a time."""
        return self.chat.map(lambda qp: self.judge_one(prompt, qp[0], qp[1]), pairs)

    def judge_candidates(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[FusedJudgments]:
        """For each (query, candidates): every prompt's normalised scores, RRF fused scores, and which candidates
        are judged irrelevant. All requests of all queries share one concurrency limit."""
        pairs = [(query, passage) for query, candidates in items for passage in candidates]
        per_prompt = {p.name: self.judge_pairs(pairs, p) for p in self.prompts}
        results, start = [], 0
        for _, candidates in items:
            end = start + len(candidates)
            scores = {name: [j.score for j in verdicts[start:end]] for name, verdicts in per_prompt.items()}
            results.append(self._fuse(scores, len(candidates)))
            start = end
        return results

    def _fuse(self, scores: dict[str, list[float | None]], num: int) -> FusedJudgments:
        fused = reciprocal_rank_fusion(list(scores.values()), k=self.config.rrf_k) if num else []
        judged = [any(s[i] is not None for s in scores.values()) for i in range(num)]
        threshold = self.config.irrelevant_threshold
        irrelevant = [judged[i] and all(s[i] is None or s[i] <= threshold for s in scores.values()) for i in range(num)]
        return FusedJudgments(scores=scores, fused=fused, judged=judged, irrelevant=irrelevant)

    def metrics(self, prefix: str = "judge/") -> dict[str, float]:
        """Request, token, cache and malformed counters as a flat dict for `mlflow.log_metrics`."""
        return {**self.chat.metrics(prefix), f"{prefix}malformed": float(self.malformed)}

    def close(self) -> None:
        self.chat.close()

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
