"""Run the evaluation tasks at every requested MRL dim and report: results JSON, a printed table, an MRL curve
(score vs dim) and, when a tracking URI is set, the same logged to MLflow through the job tracker.

Texts are encoded once at the full size; each dim then uses the first `dim` coordinates, renormalised.
Symmetric tasks (STS, classification, clustering, pairs) encode every text as a query of their task, so a
model's task prompt applies to both sides; retrieval prompts queries only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from gemb_dist.config import TrackedJobConfig
from gemb_dist.evaluate import TASK_METRICS, metrics, tasks
from gemb_dist.evaluate.encoders import Encoder, load_encoder
from gemb_dist.files import write_atomically
from gemb_dist.train.tracking import Tracker, job_tracker

MAIN_METRIC = {task: names[0] for task, names in TASK_METRICS.items()}
QUERY_BLOCK = 256  # queries scored against the corpus at once (bounds the [Q, N] score matrix)


@dataclass
class TaskFiles:
    sts: str | None = None
    retrieval: str | None = None
    classification: str | None = None  # "TRAIN,TEST"
    clustering: str | None = None
    pairs: str | None = None


class EvalConfig(TrackedJobConfig):
    """An evaluation job (`gemb eval`, `jobs/evaluate.py`)."""

    model: str = Field(..., description="Gemb model dir, sentence-transformers dir or Hugging Face model dir.")
    dims: list[int] | None = Field(None, description="MRL dims to score; None = the model's mrl_dims (or full).")
    sts: str | None = Field(None, description="STS file: csv/tsv/jsonl with sentence1, sentence2, score.")
    retrieval: str | None = Field(None, description="BEIR dir: corpus.jsonl, queries.jsonl, qrels/test.tsv.")
    classification: str | None = Field(None, description="'TRAIN,TEST' CSVs with text,label.")
    clustering: str | None = Field(None, description="CSV with text,label.")
    pairs: str | None = Field(None, description="CSV with sentence1, sentence2, label (0/1).")
    batch_size: int = Field(32, gt=0, description="Texts per encoding batch.")
    max_length: int | None = Field(
        None,
        gt=0,
        description="Tokens per text for every model (longer texts truncated); None = each model's own limit (a gemb "
        "model's trained model.max_length, a sentence-transformers model's max_seq_length). Set it when comparing "
        "models saved with different limits.",
    )
    ray_actors: int = Field(0, ge=0, description="Encode on this many Ray actors; 0 = in this process.")
    device: str | None = Field(None, description="Torch device of the encoder; None = cpu.")
    out: str = Field("results.json", description="Results JSON path; the MRL plot goes beside it (.png).")
    progress: bool = Field(True, description="Show progress bars.")

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if not any(getattr(self, name) for name in MAIN_METRIC):
            raise ValueError(f"name at least one task file: {', '.join(MAIN_METRIC)}")
        if self.dims is not None and (not self.dims or any(d <= 0 for d in self.dims)):
            raise ValueError(f"dims must be positive integers, got {self.dims}")
        return self

    def task_files(self) -> TaskFiles:
        return TaskFiles(**{name: getattr(self, name) for name in MAIN_METRIC})


# -------------------------------------------------------------------------------------------- tasks
PerDim = dict[str, dict[str, float]]


def _per_dim(emb: Sequence[np.ndarray], dims: Sequence[int], score: Callable[..., dict[str, float]]) -> PerDim:
    return {str(d): score(*(metrics.mrl_prefix(e, d) for e in emb)) for d in dims}


def run_sts(encoder: Encoder, data: tasks.STSData, dims: Sequence[int]) -> tuple[PerDim, dict]:
    a, b = (encoder.encode(s, is_query=True, task="sts") for s in (data.sentence1, data.sentence2))
    results = _per_dim([a, b], dims, lambda x, y: metrics.sts_scores(x, y, data.scores))
    return results, {"num_pairs": len(data.scores), "num_skipped_no_score": data.num_skipped}


def run_retrieval(encoder: Encoder, data: tasks.RetrievalData, dims: Sequence[int]) -> tuple[PerDim, dict]:
    doc_ids, query_ids = list(data.corpus), list(data.queries)
    docs_ND = encoder.encode([data.corpus[d] for d in doc_ids], is_query=False, task="retrieval")
    queries_QD = encoder.encode([data.queries[q] for q in query_ids], is_query=True, task="retrieval")

    def score(q_QD: np.ndarray, d_ND: np.ndarray) -> dict[str, float]:
        run: dict[str, list[tuple[str, float]]] = {}
        for start in range(0, len(query_ids), QUERY_BLOCK):
            scores_BN = q_QD[start : start + QUERY_BLOCK] @ d_ND.T  # rows are unit norm: cosine
            run.update(metrics.rank_documents(scores_BN, query_ids[start : start + QUERY_BLOCK], doc_ids, top_k=100))
        return metrics.retrieval_scores(run, data.qrels)

    return _per_dim([queries_QD, docs_ND], dims, score), {"num_queries": len(query_ids), "num_docs": len(doc_ids)}


def run_classification(
    encoder: Encoder, data: tuple[tasks.LabelledTexts, tasks.LabelledTexts], dims: Sequence[int], seed: int = 42
) -> tuple[PerDim, dict]:
    train, test = data
    subsets = metrics.undersample_indices(train.labels, samples_per_label=8, num_experiments=10, seed=seed)
    used = sorted(set().union(*subsets))  # only texts some experiment trains on are encoded
    position = {i: p for p, i in enumerate(used)}
    train_UD = encoder.encode([train.texts[i] for i in used], is_query=True, task="classification")
    test_MD = encoder.encode(test.texts, is_query=True, task="classification")
    labels = [train.labels[i] for i in used]
    local_subsets = [[position[i] for i in subset] for subset in subsets]
    results = _per_dim(
        [train_UD, test_MD],
        dims,
        lambda tr, te: metrics.classification_scores(tr, labels, te, test.labels, local_subsets),
    )
    return results, {"num_train_used": len(used), "num_test": len(test.labels), "num_labels": len(set(train.labels))}


def run_clustering(encoder: Encoder, data: tasks.LabelledTexts, dims: Sequence[int]) -> tuple[PerDim, dict]:
    emb_ND = encoder.encode(data.texts, is_query=True, task="clustering")
    results = _per_dim([emb_ND], dims, lambda e: metrics.clustering_scores(e, data.labels))
    return results, {"num_texts": len(data.texts), "num_labels": len(set(data.labels))}


def run_pairs(encoder: Encoder, data: tasks.PairData, dims: Sequence[int]) -> tuple[PerDim, dict]:
    a, b = (encoder.encode(s, is_query=True, task="pairs") for s in (data.sentence1, data.sentence2))
    return _per_dim([a, b], dims, lambda x, y: metrics.pair_scores(x, y, data.labels)), {"num_pairs": len(data.labels)}


READERS = {
    "sts": tasks.read_sts,
    "retrieval": tasks.read_retrieval,
    "classification": tasks.read_classification,
    "clustering": lambda path: tasks.read_labelled(path, "clustering"),
    "pairs": tasks.read_pairs,
}
TASK_RUNNERS = {
    "sts": run_sts,
    "retrieval": run_retrieval,
    "classification": run_classification,
    "clustering": run_clustering,
    "pairs": run_pairs,
}


def resolve_dims(encoder: Encoder, dims: Sequence[int] | None) -> list[int]:
    dims = list(dims) if dims else (encoder.mrl_dims or [encoder.dim])
    too_large = [d for d in dims if d > encoder.dim]
    if too_large:
        raise ValueError(f"dims {too_large} exceed the embedding size {encoder.dim} of {encoder.name}")
    return sorted(set(dims))


def load_tasks(files: TaskFiles) -> dict[str, Any]:
    """Read and check every named task file (before any model is loaded, so bad input fails fast)."""
    return {name: read(getattr(files, name)) for name, read in READERS.items() if getattr(files, name)}


def evaluate(
    encoder: Encoder, files: TaskFiles, dims: Sequence[int] | None = None, loaded: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Every task named in `files` at every dim: {"model", "dims", "tasks": {task: {dim: {metric: value}}},
    "info": {task: counts}}. `loaded` is `load_tasks(files)` when already read."""
    loaded = load_tasks(files) if loaded is None else loaded
    dims = resolve_dims(encoder, dims)
    results: dict[str, Any] = {"model": encoder.name, "dims": dims, "tasks": {}, "info": {}}
    for name, data in loaded.items():
        results["tasks"][name], info = TASK_RUNNERS[name](encoder, data, dims)
        results["info"][name] = {"source": getattr(files, name), **info}
    return results


# -------------------------------------------------------------------------------------------- reporting
def format_table(results: dict[str, Any]) -> str:
    """Rows task/metric, columns dims."""
    dims = [str(d) for d in results["dims"]]
    rows = [["task", "metric", *dims]]
    for task, per_dim in results["tasks"].items():
        for metric in per_dim[dims[0]]:
            rows.append([task, metric, *(f"{per_dim[d][metric]:.4f}" for d in dims)])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def plot_mrl_curve(results: dict[str, Any], path: str | Path) -> None:
    """Main metric of each task against the embedding dim (log2 axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for task, per_dim in results["tasks"].items():
        metric = MAIN_METRIC[task]
        ax.plot(
            results["dims"], [per_dim[str(d)][metric] for d in results["dims"]], marker="o", label=f"{task} {metric}"
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding dim (MRL prefix)")
    ax.set_ylabel("score")
    ax.set_title(Path(results["model"]).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_table(results: dict[str, Any], path: Path) -> None:
    """One row per (task, metric, dim), in the column layout MLflow's table view reads."""
    columns = ["task", "metric", "dim", "value"]
    rows = [
        [task, metric, int(dim), value]
        for task, per_dim in results["tasks"].items()
        for dim, values in per_dim.items()
        for metric, value in values.items()
    ]
    write_atomically(path, json.dumps({"columns": columns, "data": rows}, indent=1) + "\n")


def log_results(tracker: Tracker, results: dict[str, Any], out: Path) -> None:
    """Every score as a metric `<task>.<metric>.dim<dim>`, and the results JSON, table and plot under `eval/`."""
    tracker.log_params({"scored_dims": ",".join(map(str, results["dims"]))})
    scores = {
        f"{task}.{metric}.dim{dim}": value
        for task, per_dim in results["tasks"].items()
        for dim, values in per_dim.items()
        for metric, value in values.items()
    }
    tracker.log(scores, step=0)
    for path in (out, out.with_suffix(".table.json"), out.with_suffix(".png")):
        tracker.log_artifact(path, "eval")


def run_evaluation(config: EvalConfig, encoder: Encoder | None = None) -> dict[str, Any]:
    """Load the model, score every task and dim, write JSON + table + plot, print the table, log to MLflow if a
    tracking URI is set (the server is checked first, so a wrong URI fails before any encoding)."""
    loaded = load_tasks(config.task_files())
    out = Path(config.out)
    run_name = config.run_name or f"eval-{Path(config.model).name}"
    with job_tracker(config, job="eval", run_dir=out.parent, run_name=run_name) as tracker:
        encoder = encoder or load_encoder(
            config.model,
            batch_size=config.batch_size,
            device=config.device,
            progress=config.progress,
            ray_actors=config.ray_actors,
            max_length=config.max_length,
        )
        results = evaluate(encoder, config.task_files(), config.dims, loaded)
        results["max_length"] = config.max_length  # None: each model's own limit
        write_atomically(out, json.dumps(results, indent=2) + "\n")
        write_table(results, out.with_suffix(".table.json"))
        plot_mrl_curve(results, out.with_suffix(".png"))
        print(format_table(results))
        log_results(tracker, results, out)
    if tracker.run_id is not None:
        results["mlflow_run_id"] = tracker.run_id
    return results
