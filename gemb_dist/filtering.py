"""LLM filtering of (query, positive) pairs: drop the pairs the judge finds irrelevant (the paper's noisy-pair
filter). A pair no prompt could judge (malformed answers, failed requests) is kept and counted."""

from __future__ import annotations

from typing import Any

from gemb_dist.judge import JudgeClient


def filter_pairs(samples: list[dict[str, Any]], judge: JudgeClient) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The samples whose positive is not judged irrelevant to their query (order kept), and the counts."""
    results = judge.judge_candidates([(s["query"], [s["positive"]]) for s in samples])
    kept = [s for s, r in zip(samples, results, strict=True) if not r.irrelevant[0]]
    report = {
        "num_pairs": len(samples),
        "num_dropped": len(samples) - len(kept),
        "num_unjudged_kept": sum(1 for r in results if not r.judged[0]),
    }
    return kept, report
