"""The one JSONL reader of the project: objects with their line numbers, errors naming `file:line`; `.gz` files are
read through gzip."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded value) of every non-blank line; a line that is not JSON yields, in place of its value,
    a ValueError naming `path:line`, so a caller can count and skip it or raise it."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, ValueError(f"{path}:{number}: invalid JSON: {err.msg}")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line; a line that is not a JSON object is a ValueError naming
    `path:line`."""
    for number, record in iter_jsonl(path):
        if isinstance(record, ValueError):
            raise record
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record
