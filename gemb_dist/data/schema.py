"""The training sample: one JSON object with `task`, `query`, `positive`, `negatives` and an optional `id`.

`validate_sample` is the single gate every sample passes, at build time (errors name the input file and line)
and again when a shard is read (errors name the shard and the sample key).
"""

from __future__ import annotations

import hashlib
from typing import Any

REQUIRED_TEXT_FIELDS = ("task", "query", "positive")


def derive_sample_id(task: str, query: str, positive: str, negatives: list[str]) -> str:
    """A content hash used as the id of samples that do not carry one (stable across builds and machines)."""
    hasher = hashlib.blake2b(digest_size=12)
    for part in (task, query, positive, *negatives):
        hasher.update(part.encode("utf-8"))
        hasher.update(b"\x00")  # separator: ("ab", "c") and ("a", "bc") must hash differently
    return hasher.hexdigest()


def validate_sample(raw: Any, where: str) -> dict[str, Any]:
    """Check one decoded sample and return its normalised form (unknown fields dropped, `id` always set).

    `where` locates the sample for the error message, e.g. `data/a.jsonl:17` or `shard-000003.tar:000000000042`.
    Raises ValueError naming `where` and the offending field.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a sample must be a JSON object, got {type(raw).__name__}")
    sample: dict[str, Any] = {}
    for name in REQUIRED_TEXT_FIELDS:
        value = raw.get(name)
        if value is None:
            raise ValueError(f"{where}: missing required field {name!r} (a sample needs task, query, positive)")
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"{where}: field {name!r} is empty")
        sample[name] = value
    negatives = raw.get("negatives", [])
    if negatives is None:
        negatives = []
    if not isinstance(negatives, list):
        raise ValueError(f"{where}: field 'negatives' must be a list of strings, got {type(negatives).__name__}")
    for i, negative in enumerate(negatives):
        if not isinstance(negative, str):
            raise ValueError(f"{where}: field 'negatives[{i}]' must be a string, got {type(negative).__name__}")
        if not negative.strip():  # an absent negative is left out of the list, never written as ""
            raise ValueError(f"{where}: field 'negatives[{i}]' is empty (leave absent negatives out of the list)")
    sample["negatives"] = list(negatives)
    sample_id = raw.get("id")
    if sample_id is not None and (not isinstance(sample_id, str) or not sample_id):
        raise ValueError(f"{where}: field 'id' must be a non-empty string when present, got {sample_id!r}")
    sample["id"] = sample_id or derive_sample_id(sample["task"], sample["query"], sample["positive"], negatives)
    return sample
