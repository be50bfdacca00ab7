"""The mining job from shards to shards: read (query, positive) samples, optionally drop pairs an LLM judges
irrelevant, mine hard negatives (optionally re-ranked by the LLM judge), write fine-tuning shards, a manifest and
`mining_report.json`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from gemb_dist.batch import text_key
from gemb_dist.config import TrackedJobConfig
from gemb_dist.data.build import build_shards
from gemb_dist.data.jsonl import read_jsonl
from gemb_dist.data.manifest import load_manifest
from gemb_dist.data.reader import BadSample, ShardReader
from gemb_dist.data.storage import Storage
from gemb_dist.files import write_atomically
from gemb_dist.filtering import filter_pairs
from gemb_dist.judge import JudgeClient, JudgeConfig
from gemb_dist.mining import (
    DROP_REASONS,
    EmbeddingPool,
    EncoderConfig,
    MiningConfig,
    filter_candidates,
    quantiles,
    sample_negatives,
    search_top_k,
)

REPORT_NAME = "mining_report.json"


class MineJobConfig(TrackedJobConfig):
    """Configuration of `jobs/mine_negatives.py`."""

    input: str = Field(..., description="Shard directory or manifest (local, file:// or s3://) of (query, positive).")
    output: str = Field(..., description="Local directory for the mined shards; must not hold a dataset yet.")
    extra_corpus: str | dict[str, str] | None = Field(
        None,
        description="More passages to mine from: a .txt (one per line), a .jsonl with `text`, or shards. One "
        "location: candidates for every task's queries; a mapping task -> location: each corpus only for its task "
        "(e.g. a retrieval task's whole document collection, which other tasks' queries never see).",
    )
    encoder: EncoderConfig
    mining: MiningConfig = Field(default_factory=MiningConfig)
    judge: JudgeConfig | None = Field(None, description="LLM judge endpoint; needed by rerank and filter_pairs.")
    rerank: bool = Field(False, description="LLM re-rank the surviving candidates; negatives only from the irrelevant.")
    rerank_depth: int = Field(20, gt=0, description="Surviving candidates per query sent to the judge.")
    rerank_max_unjudged_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Fraction of re-ranked queries that may get no judgement at all (every request for their "
        "candidates failed or was malformed) before the job fails naming the count; such queries get no mined "
        "negatives and are counted in the report (rerank.unjudged_queries).",
    )
    filter_pairs: bool = Field(False, description="Drop (query, positive) pairs the LLM judges irrelevant.")
    samples_per_shard: int = Field(10_000, gt=0, description="Samples per written shard.")

    @model_validator(mode="after")
    def _check(self) -> MineJobConfig:
        if (self.rerank or self.filter_pairs) and self.judge is None:
            raise ValueError("rerank and filter_pairs need a `judge` section (base_url, model)")
        return self


# ------------------------------------------------------------------------------------------------ reading
def read_samples(location: str) -> list[dict[str, Any]]:
    """Every validated sample of a dataset, in manifest order; any unreadable sample is an error naming its shard."""
    storage = Storage(location)
    manifest = load_manifest(storage)
    reader = ShardReader(manifest, storage)
    samples: list[dict[str, Any]] = []
    try:
        for index, shard in enumerate(manifest.shards):
            if shard.num_samples == 0:
                raise ValueError(f"{storage.url(shard.path)}: shard holds no samples (no positives to mine for)")
            for sample in reader.fetch(index, list(range(shard.num_samples))).values():
                if isinstance(sample, BadSample):
                    raise ValueError(f"cannot mine from a bad sample: {sample.reason}")
                samples.append(sample)
    finally:
        reader.close()
    return samples


def read_passages(location: str) -> list[str]:
    """Passages of the extra corpus: lines of a .txt, the `text` of each .jsonl object, or every positive and
    negative of a shard dataset."""
    if location.endswith(".txt"):
        return [line.strip() for line in Path(location).read_text(encoding="utf-8").splitlines() if line.strip()]
    if location.endswith(".jsonl"):
        passages = []
        for number, record in read_jsonl(location):
            if not isinstance(record.get("text"), str):
                raise ValueError(f"{location}:{number}: an extra-corpus line must be an object with a string `text`")
            if not record["text"].strip():
                raise ValueError(f"{location}:{number}: field 'text' is empty")
            passages.append(record["text"])
        return passages
    return [text for s in read_samples(location) for text in (s["positive"], *s["negatives"])]


def read_extra_corpus(location: str | dict[str, str] | None, tasks: set[str]) -> dict[str | None, list[str]]:
    """The extra corpus by task (None = for every task); a task the input does not hold is an error naming it."""
    if location is None:
        return {}
    if isinstance(location, str):
        return {None: read_passages(location)}
    unknown = sorted(set(location) - tasks)
    if unknown:
        raise ValueError(f"extra_corpus names tasks {unknown} that no input sample has (tasks: {sorted(tasks)})")
    return {task: read_passages(path) for task, path in location.items()}


# ------------------------------------------------------------------------------------------------ corpus
class Corpus:
    """Unique passage texts, their hashes, and the tasks each is a candidate for: the tasks whose positives hold
    it, plus the task its extra corpus was given for (`extra` maps a task to passages; the key None = every task)."""

    def __init__(self, samples: list[dict[str, Any]], extra: dict[str | None, list[str]]):
        self.texts: list[str] = []
        self.keys: list[int] = []
        self.tasks: list[set[str]] = []
        self._index: dict[str, int] = {}
        self.extra_ids: dict[str | None, list[int]] = {}
        for sample in samples:
            self.tasks[self._add(sample["positive"])].add(sample["task"])
        for task, texts in extra.items():
            self.extra_ids[task] = sorted({self._add(text) for text in texts})

    def _add(self, text: str) -> int:
        index = self._index.get(text)
        if index is None:
            index = self._index[text] = len(self.texts)
            self.texts.append(text)
            self.keys.append(text_key(text))
            self.tasks.append(set())
        return index

    def id_of(self, text: str) -> int:
        return self._index[text]

    def ids_for_task(self, task: str | None) -> np.ndarray:
        if task is None:
            return np.arange(len(self.texts))
        ids = {i for i, tasks in enumerate(self.tasks) if task in tasks}
        ids |= set(self.extra_ids.get(None, ())) | set(self.extra_ids.get(task, ()))
        return np.array(sorted(ids), dtype=np.int64)


# ------------------------------------------------------------------------------------------------ mining
def mine_negatives(
    samples: list[dict[str, Any]],
    extra_passages: list[str] | dict[str | None, list[str]],
    pool: EmbeddingPool,
    config: MiningConfig,
    judge: JudgeClient | None = None,
    rerank_depth: int = 20,
    max_unjudged_fraction: float = 0.0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Samples with `negatives` filled (same order, same ids) and a report of what was dropped and the scores.
    With `judge`, the first `rerank_depth` surviving candidates are judged and negatives come only from those
    judged irrelevant, hardest (best fused rank) first; a query none of whose candidates got a judgement is
    counted, and more than `max_unjudged_fraction` of them is a ValueError naming the count. `extra_passages` are
    candidates for every task, or per task as a mapping (key None = every task)."""
    timings: dict[str, float] = {}
    extra = extra_passages if isinstance(extra_passages, dict) else {None: list(extra_passages)}
    corpus = Corpus(samples, extra)
    start = time.perf_counter()
    corpus_CD = pool.encode(corpus.texts, is_query=False)
    timings["embed_corpus_s"] = time.perf_counter() - start

    excluded: dict[tuple[str, str], set[int]] = defaultdict(set)
    for sample in samples:
        excluded[sample["task"], sample["query"]].update({text_key(sample["positive"]), text_key(sample["query"])})
    depth = config.top_k + max((len(keys) for keys in excluded.values()), default=0)
    by_task: dict[str, list[str]] = defaultdict(list)
    for task, query in excluded:
        by_task[task].append(query)

    candidates: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # -> (rep, ids, scores)
    timings["embed_queries_s"] = timings["search_s"] = 0.0
    for task in sorted(by_task):
        start = time.perf_counter()
        queries_QD = pool.encode(by_task[task], is_query=True, task=task)
        timings["embed_queries_s"] += time.perf_counter() - start
        start = time.perf_counter()
        ids_C = corpus.ids_for_task(task if config.same_task else None)
        scores_QK, local_QK = search_top_k(
            queries_QD, corpus_CD[ids_C], depth, config.index, config.search_chunk, config.faiss_factory
        )
        timings["search_s"] += time.perf_counter() - start
        for row, query in enumerate(by_task[task]):
            candidates[task, query] = (queries_QD[row], ids_C[local_QK[row]], scores_QK[row])

    selections, positive_scores = [], []
    for sample in samples:
        rep_D, ids_K, scores_K = candidates[sample["task"], sample["query"]]
        positive_score = float(rep_D @ corpus_CD[corpus.id_of(sample["positive"])])
        positive_scores.append(positive_score)
        keys = excluded[sample["task"], sample["query"]]
        selections.append(filter_candidates(ids_K, scores_K, positive_score, keys, corpus.keys, config))

    orders = [list(range(len(s.ids))) for s in selections]
    rerank_report = None
    if judge is not None:
        orders, rerank_report = _rerank(samples, selections, corpus, judge, rerank_depth)
        _check_unjudged(rerank_report, len(samples), max_unjudged_fraction, judge)

    mined, negative_scores, margins, counts = [], [], [], Counter()
    for sample, selection, order, positive_score in zip(samples, selections, orders, positive_scores, strict=True):
        chosen = sample_negatives(order, config.num_negatives, config.sampling, config.seed, sample["id"])
        negatives = [corpus.texts[selection.ids[p]] for p in chosen]
        negative_scores.extend(selection.scores[p] for p in chosen)
        margins.extend(positive_score - selection.scores[p] for p in chosen)
        counts[len(negatives)] += 1
        if config.keep_existing_negatives:
            negatives = sample["negatives"] + [n for n in negatives if n not in sample["negatives"]]
        mined.append({**sample, "negatives": negatives})

    report = {
        "num_queries": len(samples),
        "num_corpus_passages": len(corpus.texts),
        "num_extra_passages": {task or "*": len(ids) for task, ids in corpus.extra_ids.items()},
        "num_negatives_wanted": config.num_negatives,
        "num_queries_fewer_than_k": sum(n for k, n in counts.items() if k < config.num_negatives),
        "negatives_per_query": {str(k): counts[k] for k in sorted(counts)},
        "dropped": {reason: sum(s.dropped[reason] for s in selections) for reason in DROP_REASONS},
        "scores": {
            "positive": quantiles(positive_scores),
            "negative": quantiles(negative_scores),
            "positive_minus_negative": quantiles(margins),
        },
        "rerank": rerank_report,
        "embedding_backend": pool.backend,
        "timings": timings,
    }
    return mined, report


def _rerank(samples, selections, corpus: Corpus, judge: JudgeClient, depth: int):
    """Per sample, the positions of its judged-irrelevant candidates in fused order (best first)."""
    pairs = zip(samples, selections, strict=True)
    items = [(sample["query"], [corpus.texts[c] for c in sel.ids[:depth]]) for sample, sel in pairs]
    results = judge.judge_candidates(items)
    orders = [[i for i in r.fused_order() if r.irrelevant[i]] for r in results]
    report = {
        # A query with candidates but not one judgement would otherwise look like "nothing was irrelevant".
        "unjudged_queries": sum(1 for r in results if r.judged and not any(r.judged)),
        "judged_candidates": sum(sum(r.judged) for r in results),
        "unjudged_candidates": sum(len(r.judged) - sum(r.judged) for r in results),
        "irrelevant_candidates": sum(sum(r.irrelevant) for r in results),
    }
    return orders, report


def _check_unjudged(report: dict[str, Any], num_queries: int, max_fraction: float, judge: JudgeClient) -> None:
    unjudged = report["unjudged_queries"]
    if unjudged > max_fraction * num_queries:
        counters = judge.metrics(prefix="")
        raise ValueError(
            f"LLM re-ranking got no judgement for {unjudged} of {num_queries} queries "
            f"(rerank_max_unjudged_fraction={max_fraction}); judge {judge.config.base_url}: "
            f"{int(counters['failed'])} failed requests, {int(counters['malformed'])} malformed answers"
        )


# ------------------------------------------------------------------------------------------------ the job
def write_dataset(samples: list[dict[str, Any]], output: str, samples_per_shard: int) -> None:
    """Write shards + manifest through the data build (one writer for every dataset in the project)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".mined-", dir=out.parent))
    try:
        jsonl = staging / "samples.jsonl"
        with open(jsonl, "w", encoding="utf-8") as handle:
            for sample in samples:
                handle.write(json.dumps(sample, ensure_ascii=False) + "\n")
        build_shards([str(jsonl)], str(out), samples_per_shard=samples_per_shard)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """A data job's report JSON (atomically: a reader never sees half a report)."""
    write_atomically(path, json.dumps(report, indent=1, sort_keys=True) + "\n")


def run_mining(config: MineJobConfig, pool: EmbeddingPool | None = None) -> dict[str, Any]:
    """The whole job; the judge is contacted first so that a bad endpoint fails before any embedding work.
    `pool` reuses an already loaded encoder (it is not closed); None loads `config.encoder`."""
    if (Path(config.output) / "manifest.json").exists():
        raise ValueError(f"{config.output}: already holds a dataset (manifest.json); choose an empty output directory")
    judge = JudgeClient(config.judge) if config.judge is not None else None
    try:
        samples = read_samples(config.input)
        extra = read_extra_corpus(config.extra_corpus, {s["task"] for s in samples})
        report: dict[str, Any] = {"input": config.input, "output": config.output, "num_samples_in": len(samples)}
        if config.filter_pairs:
            assert judge is not None
            samples, report["filter_pairs"] = filter_pairs(samples, judge)
        if not samples:
            raise ValueError(f"{config.input}: no samples left to mine for (all pairs were filtered out)")
        own_pool = pool is None
        pool = EmbeddingPool(config.encoder) if own_pool else pool
        try:
            mined, mining_report = mine_negatives(
                samples,
                extra,
                pool,
                config.mining,
                judge if config.rerank else None,
                config.rerank_depth,
                config.rerank_max_unjudged_fraction,
            )
        finally:
            if own_pool:
                pool.close()
        write_dataset(mined, config.output, config.samples_per_shard)
        report.update(mining_report, num_samples_out=len(mined))
        report["judge"] = judge.metrics(prefix="") if judge is not None else None
        write_report(Path(config.output) / REPORT_NAME, report)
        return report
    finally:
        if judge is not None:
            judge.close()
