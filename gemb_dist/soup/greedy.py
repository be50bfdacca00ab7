"""Greedy soup selection (Wortsman et al. 2022), independent of what is scored."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GreedyResult:
    selected: list[str]
    individual_scores: dict[str, float]
    trials: list[dict[str, Any]] = field(default_factory=list)  # each: candidate, score, accepted
    score: float = float("nan")


def greedy_select(candidates: Sequence[str], score: Callable[[Sequence[str]], float]) -> GreedyResult:
    """Greedy soup (Wortsman et al. 2022): rank ingredients by their own held-out score, best first; start from
    the best and add each next one only if the uniform soup with it scores strictly higher."""
    if not candidates:
        raise ValueError("greedy soup needs at least one ingredient")
    individual = {c: float(score([c])) for c in candidates}
    ranked = sorted(candidates, key=lambda c: -individual[c])  # stable: ties keep the configured order
    result = GreedyResult(selected=[ranked[0]], individual_scores=individual, score=individual[ranked[0]])
    for candidate in ranked[1:]:
        trial = float(score([*result.selected, candidate]))
        accepted = trial > result.score
        result.trials.append({"candidate": candidate, "score": trial, "accepted": accepted})
        if accepted:
            result.selected.append(candidate)
            result.score = trial
    return result
