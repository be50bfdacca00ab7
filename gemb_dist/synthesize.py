"""Synthetic training data from passages through an OpenAI-compatible LLM: retrieval queries that a passage answers,
and classification-style examples (e.g. counterfactual statements) with labels from a fixed set. Answers are
parsed, validated and deduplicated; every sample's task and id carry `synthetic`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, Literal

from pydantic import Field, model_validator

from gemb_dist.batch import text_key
from gemb_dist.config import Section, TrackedJobConfig
from gemb_dist.llm_client import ChatClient, Completion, LLMEndpointConfig

RETRIEVAL_TEMPLATE = (
    "<passage>{passage}</passage>\n"
    "Write {num} different search queries that a user could type and for which this passage is the best answer. "
    "Vary the style: questions, keyword queries, longer descriptions. Do not copy sentences from the passage.\n"
    "Reply with a JSON array of {num} strings and nothing else."
)
COUNTERFACTUAL_TEMPLATE = (
    "<passage>{passage}</passage>\n"
    "Write {num} short texts in the style and domain of this passage. Label each with one of: {labels}. "
    "A counterfactual text states something that did not happen or is wished for "
    '("I wish it had...", "if only...", "it would have been better if..."); a factual one states what is.\n'
    'Reply with a JSON array of {num} objects {{"text": ..., "label": ...}} and nothing else.'
)
TEMPLATE_VERSION = 1  # bump when answers are read differently with the same template text
_JSON_ARRAY = re.compile(r"\[.*\]", re.S)


class SynthesisTask(Section):
    name: str = Field(..., description="Task name of the written samples; must contain 'synthetic'.")
    kind: Literal["retrieval", "classification"] = Field(
        "retrieval",
        description="retrieval: (query, passage); classification: (text, label) with other labels as negatives.",
    )
    num_per_passage: int = Field(3, gt=0, description="Items requested per passage.")
    template: str | None = Field(
        None, description="Prompt with {passage}, {num} (and {labels} for classification); None = the built-in one."
    )
    labels: list[str] = Field(
        default_factory=lambda: ["counterfactual", "not counterfactual"],
        description="Allowed labels of classification tasks (the label text is the positive).",
    )

    @model_validator(mode="after")
    def _check(self) -> SynthesisTask:
        if "synthetic" not in self.name:
            raise ValueError(f"tasks[].name {self.name!r} must contain 'synthetic' so the data stays identifiable")
        needed = ["{passage}", "{num}"] + (["{labels}"] if self.kind == "classification" else [])
        missing = [p for p in needed if self.template is not None and p not in self.template]
        if missing:
            raise ValueError(f"tasks[{self.name}].template lacks the placeholders {missing}")
        if self.kind == "classification" and len(set(self.labels)) < 2:
            raise ValueError(f"tasks[{self.name}].labels needs at least two distinct labels")
        return self

    def prompt(self, passage: str) -> str:
        default = RETRIEVAL_TEMPLATE if self.kind == "retrieval" else COUNTERFACTUAL_TEMPLATE
        labels = ", ".join(json.dumps(label) for label in self.labels)
        return (self.template or default).format(passage=passage, num=self.num_per_passage, labels=labels)


class ValidationConfig(Section):
    """Checks every generated text must pass to be written."""

    min_words: int = Field(2, gt=0, description="Generated texts with fewer words are rejected.")
    max_words: int = Field(80, gt=0, description="Generated texts with more words are rejected.")
    max_passage_overlap: float = Field(
        0.9, gt=0, le=1, description="Reject a query whose words are (at least) this fraction copied from the passage."
    )


def normalized(text: str) -> str:
    """The form duplicates are detected on: lower case, single spaces, no trailing punctuation."""
    return " ".join(text.lower().split()).strip(" .?!")


def parse_items(content: str | None) -> list[Any] | None:
    """The JSON array in an answer (models often wrap it in prose or code fences); None when there is none."""
    match = _JSON_ARRAY.search(content or "")
    if match is None:
        return None
    try:
        items = json.loads(match.group())
    except json.JSONDecodeError:
        return None
    return items if isinstance(items, list) else None


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def check_text(text: Any, passage: str, validation: ValidationConfig) -> str | None:
    """The reason a generated text is rejected, or None when it is usable."""
    if not isinstance(text, str) or not text.strip():
        return "not_a_string"
    words = _words(text)
    if not validation.min_words <= len(words) <= validation.max_words:
        return "length"
    if "<passage>" in text or normalized(text) == normalized(passage):
        return "copies_prompt"
    passage_words = set(_words(passage))
    if len(words) >= 4 and sum(w in passage_words for w in words) / len(words) >= validation.max_passage_overlap:
        return "copies_passage"
    return None


def synthesize(
    passages: list[str], tasks: list[SynthesisTask], client: ChatClient, validation: ValidationConfig
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Samples generated for every (task, passage), deduplicated per task, in (task, passage, item) order, and a
    report of requests, malformed answers and rejections by reason."""
    samples: list[dict[str, Any]] = []
    report: dict[str, Any] = {"num_passages": len(passages), "tasks": {}}
    for task in tasks:
        completions = client.map(lambda p, task=task: _generate(client, task, p), passages)
        counts: Counter[str] = Counter()
        seen: set[str] = set()
        for passage, completion in zip(passages, completions, strict=True):
            items = parse_items(completion.content) if completion.status == "ok" else None
            if items is None:
                counts["failed_answers" if completion.status == "failed" else "malformed_answers"] += 1
                continue
            for item in items:
                sample, reason = _to_sample(task, passage, item, validation)
                if sample is not None and normalized(sample["query"]) in seen:
                    reason = "duplicate"
                if reason is not None:
                    counts[f"rejected_{reason}"] += 1
                    continue
                seen.add(normalized(sample["query"]))
                samples.append(sample)
                counts["written"] += 1
        report["tasks"][task.name] = dict(sorted(counts.items()))
    report["num_samples"] = len(samples)
    return samples, report


def _generate(client: ChatClient, task: SynthesisTask, passage: str) -> Completion:
    # Only answers holding a JSON array are cached: a rambling answer is asked again on the next run.
    return client.complete(
        task.prompt(passage),
        template_version=f"synthesis/{task.kind}/v{TEMPLATE_VERSION}",
        well_formed=lambda content: parse_items(content) is not None,
    )


def _to_sample(
    task: SynthesisTask, passage: str, item: Any, validation: ValidationConfig
) -> tuple[dict[str, Any] | None, str | None]:
    if task.kind == "retrieval":
        text, positive, negatives = item, passage, []
    else:
        if not isinstance(item, dict) or item.get("label") not in task.labels:
            return None, "bad_label"
        text, positive = item.get("text"), item["label"]
        negatives = [label for label in task.labels if label != positive]
    reason = check_text(text, passage, validation)
    if reason is not None:
        return None, reason
    text = " ".join(text.split())
    sample_id = f"synthetic-{task.name}-{text_key(task.name + chr(0) + text + chr(0) + positive) & (2**64 - 1):016x}"
    return {"task": task.name, "query": text, "positive": positive, "negatives": negatives, "id": sample_id}, None


class SynthesizeJobConfig(TrackedJobConfig):
    """Configuration of `jobs/synthesize.py`."""

    input: str = Field(..., description="Passages: a .txt (one per line), a .jsonl with `text`, or shards (positives).")
    output: str = Field(..., description="Local directory for the synthetic shards; must not hold a dataset yet.")
    llm: LLMEndpointConfig = Field(..., description="Generation endpoint (set max_tokens and temperature for it).")
    tasks: list[SynthesisTask] = Field(..., min_length=1, description="What to generate from every passage.")
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    max_passages: int | None = Field(None, gt=0, description="Use only the first N unique passages.")
    samples_per_shard: int = Field(10_000, gt=0, description="Samples per written shard.")

    @model_validator(mode="after")
    def _check(self) -> SynthesizeJobConfig:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks[].name must be unique, got {names}")
        return self


REPORT_NAME = "synthesize_report.json"


def run_synthesis(config: SynthesizeJobConfig) -> dict[str, Any]:
    """The whole job: probe the endpoint (fails at start naming the URL), generate, write shards + manifest +
    `synthesize_report.json` (counters included) into `config.output`."""
    from pathlib import Path

    from gemb_dist.mining_pipeline import read_passages, write_dataset, write_report

    if (Path(config.output) / "manifest.json").exists():
        raise ValueError(f"{config.output}: already holds a dataset (manifest.json); choose an empty output directory")
    client = ChatClient(config.llm)
    try:
        passages = list(dict.fromkeys(p for p in read_passages(config.input) if p.strip()))
        passages = passages[: config.max_passages] if config.max_passages else passages
        if not passages:
            raise ValueError(f"{config.input}: no passages to generate from")
        samples, report = synthesize(passages, config.tasks, client, config.validation)
        if not samples:
            raise ValueError(f"no valid synthetic samples from {config.input}; see the counts: {report['tasks']}")
        write_dataset(samples, config.output, config.samples_per_shard)
        report.update(input=config.input, output=config.output, llm=client.metrics())
        write_report(Path(config.output) / REPORT_NAME, report)
        return report
    finally:
        client.close()
