"""Task prompts: the query side gets its task's template (`t ⊕ q`), documents never get one."""

from __future__ import annotations

from collections.abc import Mapping


def format_query(text: str, task: str | None, prompts: Mapping[str, str], default_prompt: str = "{text}") -> str:
    """Apply the template of `task` (or `default_prompt`) to one query text."""
    template = prompts.get(task, default_prompt) if task is not None else default_prompt
    return template.replace("{text}", text)
