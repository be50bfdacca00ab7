"""Helpers shared by the public-data recipe's scripts: atomic writes and the check that a step's input exists."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temp file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_input(path: Path, made_by: str) -> Path:
    """`path` if it exists; otherwise stop, saying which earlier step writes it."""
    if not Path(path).exists():
        raise SystemExit(f"recipe: {path} is missing; it is made by the step '{made_by}' (run that step first)")
    return Path(path)
