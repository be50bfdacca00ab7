"""Hard-negative mining: embed queries and a corpus of passages, retrieve the top-k per query, drop candidates
that are (or score like) the positive, and sample `num_negatives` per query deterministically.

Embedding runs in parallel Ray actors when Ray is initialised in the calling process (`ray.init()`, as inside
`ray job submit`), else in this process; `EmbeddingPool.backend` says which. Search is an exact chunked matmul
or a FAISS index. The shard-to-shard pipeline around these parts is `gemb_dist.mining_pipeline`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from gemb_dist.batch import text_key
from gemb_dist.config import Section
from gemb_dist.evaluate.metrics import normalize_rows


class EncoderConfig(Section):
    """The model that embeds queries and passages for mining, and where it runs."""

    path: str = Field(
        ..., description="Any model `gemb eval` accepts: gemb model dir, sentence-transformers dir, plain HF dir."
    )
    batch_size: int = Field(64, gt=0, description="Texts per forward pass.")
    num_actors: int = Field(
        0,
        ge=0,
        description="Ray embedding actors, one CPU each (joining the job's Ray cluster, else starting a local one); "
        "0 = embed in this process.",
    )
    device: str | None = Field(None, description="torch device of the encoder; None = CPU.")


class MiningConfig(Section):
    """Which retrieved candidates become hard negatives: depth, filters on their scores, sampling."""

    top_k: int = Field(50, gt=0, description="Candidates retrieved per query (positives excluded): ranks [0, top_k).")
    skip_top: int = Field(0, ge=0, description="Skip the first r candidate ranks (likely unlabelled positives).")
    num_negatives: int = Field(7, gt=0, description="Negatives kept per query.")
    sampling: Literal["top", "random"] = Field(
        "top", description="top = the best-ranked surviving candidates; random = a seeded sample of them."
    )
    max_score_ratio: float | None = Field(
        None, gt=0, description="Drop candidates scoring above ratio * positive score (NV-Retriever TopK-PercPos)."
    )
    margin: float | None = Field(None, description="Drop candidates scoring above positive score - margin.")
    max_score: float | None = Field(None, description="Drop candidates scoring above this absolute cosine.")
    index: Literal["exact", "faiss"] = Field("exact", description="exact = chunked torch matmul; faiss = FAISS index.")
    faiss_factory: str = Field("Flat", description="faiss.index_factory string (inner product metric).")
    search_chunk: int = Field(1024, gt=0, description="Queries per exact-search matmul.")
    same_task: bool = Field(True, description="Only passages of the query's own task (plus the extra corpus) compete.")
    seed: int = Field(0, description="Seed of random sampling (per query, independent of order and parallelism).")
    keep_existing_negatives: bool = Field(False, description="Keep a sample's negatives and append mined ones.")

    @model_validator(mode="after")
    def _check(self) -> MiningConfig:
        if self.skip_top >= self.top_k:
            raise ValueError(f"mining.skip_top ({self.skip_top}) must be smaller than mining.top_k ({self.top_k})")
        return self


# ------------------------------------------------------------------------------------------------ embedding
class EmbeddingPool:
    """Embeds texts through the evaluation encoders (`gemb_dist.evaluate.encoders`): on `num_actors` Ray actors
    (`backend == "ray"`), or in this process when `num_actors` is 0 (`backend == "local"`).
    Output rows follow input order and are L2-normalised, so inner products are cosines."""

    def __init__(self, config: EncoderConfig):
        from gemb_dist.evaluate.encoders import load_encoder

        self.backend = "ray" if config.num_actors > 0 else "local"
        self.encoder = load_encoder(
            config.path,
            batch_size=config.batch_size,
            device=config.device,
            progress=False,
            ray_actors=config.num_actors,
        )

    def encode(self, texts: Sequence[str], *, is_query: bool, task: str | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        reps_ND = self.encoder.encode(list(texts), is_query=is_query, task=task)
        return normalize_rows(np.asarray(reps_ND, dtype=np.float32))

    def close(self) -> None:
        close = getattr(self.encoder, "close", None)
        if close is not None:
            close()


# ------------------------------------------------------------------------------------------------ search
def search_top_k(
    queries_QD: np.ndarray,
    corpus_CD: np.ndarray,
    k: int,
    index: str = "exact",
    chunk: int = 1024,
    factory: str = "Flat",
) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product top-k of every query over the corpus: (scores [Q, k'], corpus ids [Q, k']), best first,
    with k' = min(k, C)."""
    k = min(k, corpus_CD.shape[0])
    if k == 0 or queries_QD.shape[0] == 0:
        return np.zeros((queries_QD.shape[0], 0), np.float32), np.zeros((queries_QD.shape[0], 0), np.int64)
    if index == "faiss":
        import faiss

        faiss_index = faiss.index_factory(corpus_CD.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not faiss_index.is_trained:
            faiss_index.train(np.ascontiguousarray(corpus_CD, dtype=np.float32))
        faiss_index.add(np.ascontiguousarray(corpus_CD, dtype=np.float32))
        scores_QK, ids_QK = faiss_index.search(np.ascontiguousarray(queries_QD, dtype=np.float32), k)
        return scores_QK.astype(np.float32), ids_QK.astype(np.int64)
    corpus_DC = torch.from_numpy(np.ascontiguousarray(corpus_CD, dtype=np.float32)).T
    scores, ids = [], []
    for start in range(0, queries_QD.shape[0], chunk):
        chunk_QD = torch.from_numpy(np.ascontiguousarray(queries_QD[start : start + chunk], dtype=np.float32))
        top = torch.topk(chunk_QD @ corpus_DC, k, dim=1)  # [q, C] -> [q, k]
        scores.append(top.values.numpy())
        ids.append(top.indices.numpy())
    return np.concatenate(scores), np.concatenate(ids).astype(np.int64)


# ------------------------------------------------------------------------------------------------ selection
DROP_REASONS = ("positive", "skip_top", "max_score_ratio", "margin", "max_score")


@dataclass
class Selection:
    """The candidates of one query that survive filtering (corpus ids and scores, best first) and why others
    were dropped."""

    ids: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))


def filter_candidates(
    candidate_ids: Sequence[int],
    candidate_scores: Sequence[float],
    positive_score: float,
    excluded_keys: set[int],
    corpus_keys: Sequence[int],
    config: MiningConfig,
) -> Selection:
    """Apply, in order: drop texts equal to a positive or the query (hash), keep ranks [skip_top, top_k) of the
    rest, then the positive-aware thresholds. The survivors keep their rank order."""
    selection = Selection()
    rank = 0
    for cid, score in zip(candidate_ids, candidate_scores, strict=True):
        if corpus_keys[cid] in excluded_keys:
            selection.dropped["positive"] += 1
            continue
        if rank >= config.top_k:
            break
        rank += 1
        if rank <= config.skip_top:
            selection.dropped["skip_top"] += 1
        elif config.max_score_ratio is not None and score > config.max_score_ratio * positive_score:
            selection.dropped["max_score_ratio"] += 1
        elif config.margin is not None and score > positive_score - config.margin:
            selection.dropped["margin"] += 1
        elif config.max_score is not None and score > config.max_score:
            selection.dropped["max_score"] += 1
        else:
            selection.ids.append(int(cid))
            selection.scores.append(float(score))
    return selection


def sample_negatives(order: Sequence[int], num: int, sampling: str, seed: int, sample_id: str) -> list[int]:
    """Pick `num` positions from `order` (best first): the first ones, or a sample seeded by (seed, sample id) so
    that the choice does not depend on the order queries are processed in. Returned in `order` order."""
    if sampling == "top" or len(order) <= num:
        return list(order[:num])
    rng = np.random.default_rng([seed & 0xFFFFFFFF, text_key(sample_id) & 0xFFFFFFFFFFFFFFFF])
    chosen = sorted(rng.choice(len(order), size=num, replace=False).tolist())
    return [order[i] for i in chosen]


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """min / p05 / p25 / p50 / p75 / p95 / max / mean / count of a score distribution (empty -> count 0)."""
    if not len(values):
        return {"count": 0}
    array = np.asarray(values, dtype=np.float64)
    points = {"min": 0, "p05": 5, "p25": 25, "p50": 50, "p75": 75, "p95": 95, "max": 100}
    stats = {name: float(np.percentile(array, q)) for name, q in points.items()}
    stats["mean"] = float(array.mean())
    stats["count"] = int(array.size)
    return stats
