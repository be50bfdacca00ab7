"""The soup job: resolve the ingredients, pick weights (greedy: by a held-out score), average, export, write the
output dir atomically, and log the lineage in one tracked run."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemb_dist.export import EXPORT_INFO_FILE
from gemb_dist.files import atomic_dir
from gemb_dist.model import WEIGHTS_NAME
from gemb_dist.soup.average import average_model_dirs
from gemb_dist.soup.checks import check_same_architecture, check_same_tensors
from gemb_dist.soup.config import HeldOutConfig, SoupConfig
from gemb_dist.soup.greedy import greedy_select
from gemb_dist.soup.ingredients import resolve_ingredient
from gemb_dist.train.tracking import Tracker, configured_tracking_uri, job_tracker

LINEAGE_FILE = "soup.json"


@dataclass
class SoupResult:
    output_dir: Path
    lineage: dict[str, Any]


def held_out_scorer(held_out: HeldOutConfig) -> Callable[[Path], float]:
    """Score of a model dir on the held-out tasks: `held_out.metric` at `held_out.dim`."""
    from gemb_dist.evaluate.encoders import load_encoder
    from gemb_dist.evaluate.runner import TaskFiles, evaluate, load_tasks

    task, _, metric = held_out.metric.partition(".")
    files = TaskFiles(**{task: getattr(held_out, task)})  # only the task the metric belongs to is run
    loaded = load_tasks(files)  # read (and checked) once, before any ingredient is scored

    def score(model_dir: Path) -> float:
        encoder = load_encoder(str(model_dir), batch_size=held_out.batch_size, progress=False)
        dim = held_out.dim or encoder.dim
        results = evaluate(encoder, files, dims=[dim], loaded=loaded)
        return float(results["tasks"][task][str(dim)][metric])

    return score


def _choose_weights(
    config: SoupConfig, model_dirs: list[Path], scratch: Path, score_fn: Callable[[Path], float] | None
) -> tuple[list[float], dict[str, Any]]:
    if config.method == "weighted":
        return [float(i.weight) for i in config.ingredients], {}
    if config.method == "uniform":
        return [1.0] * len(model_dirs), {}
    score_fn = score_fn or held_out_scorer(config.held_out)
    trial_count = 0

    def score(selection: Sequence[int]) -> float:
        nonlocal trial_count
        if len(selection) == 1:
            return score_fn(model_dirs[selection[0]])
        trial_count += 1
        trial_dir = scratch / f"trial-{trial_count}"
        trial_dir.mkdir()
        try:
            average_model_dirs([model_dirs[i] for i in selection], None, trial_dir)
            return score_fn(trial_dir)
        finally:
            shutil.rmtree(trial_dir, ignore_errors=True)

    greedy = greedy_select(list(range(len(model_dirs))), score)
    weights = [1.0 if i in greedy.selected else 0.0 for i in range(len(model_dirs))]
    details = {
        "metric": config.held_out.metric,
        "dim": config.held_out.dim,
        "order": greedy.selected[:1] + [t["candidate"] for t in greedy.trials],
        "trials": greedy.trials,
        "soup_score": greedy.score,
    }
    individual = [greedy.individual_scores[i] for i in range(len(model_dirs))]
    return weights, {"individual_scores": individual, **details}


def make_soup(config: SoupConfig, score_fn: Callable[[Path], float] | None = None) -> SoupResult:
    """Resolve the ingredients, pick weights (greedy: by `score_fn`, default the held-out evaluator), average,
    export, and write `config.output_dir` atomically; a failure leaves no output dir behind."""
    target = Path(config.output_dir)
    tracking_uri = configured_tracking_uri(config.mlflow)
    if target.exists() and not config.overwrite:
        raise ValueError(f"output_dir {target} already exists (set overwrite: true to replace it)")
    with atomic_dir(target) as tmp:
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.scratch-", dir=target.parent) as scratch:
            model_dirs = [
                resolve_ingredient(ingredient, Path(scratch), n, tracking_uri)
                for n, ingredient in enumerate(config.ingredients)
            ]
            check_same_architecture(model_dirs)  # fail before any (slow) evaluation
            check_same_tensors([d / WEIGHTS_NAME for d in model_dirs])
            weights, greedy = _choose_weights(config, model_dirs, Path(scratch), score_fn)
            chosen = [n for n, w in enumerate(weights) if w > 0]
            average_model_dirs([model_dirs[n] for n in chosen], [weights[n] for n in chosen], tmp)
        if config.export_sentence_transformers:
            from gemb_dist.model import EmbeddingModel

            EmbeddingModel.load(tmp).export_sentence_transformers(tmp / "sentence_transformers")
        lineage = {
            "method": config.method,
            "ingredients": [
                {"source": i.label, "weight": weights[n] / math.fsum(weights)} for n, i in enumerate(config.ingredients)
            ],
            **({"greedy": greedy} if greedy else {}),
        }
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n")
    return SoupResult(output_dir=target, lineage=lineage)


def run_soup(config: SoupConfig, score_fn: Callable[[Path], float] | None = None) -> SoupResult:
    """The soup job: `make_soup` inside one tracked run (opened first, so a tracking server that does not answer
    fails the job before any work), then its lineage logged."""
    output_dir = Path(config.output_dir)
    run_name = config.run_name or f"soup-{output_dir.name}"
    with job_tracker(config, job="soup", run_dir=output_dir.parent, run_name=run_name) as tracker:
        result = make_soup(config, score_fn)
        log_lineage(tracker, result)
    return result


def log_lineage(tracker: Tracker, result: SoupResult) -> None:
    """Ingredient sources and weights as params, held-out scores as metrics, `soup.json`, and the
    sentence-transformers export as an MLflow model whose metadata holds the MRL dims and prompts.

    Loaders pick a size with `SentenceTransformer(path, truncate_dim=d)`, d one of `metadata["mrl_dims"]`.
    """
    lineage = result.lineage
    params: dict[str, Any] = {}
    for n, ingredient in enumerate(lineage["ingredients"]):
        params[f"ingredient_{n}"] = ingredient["source"]
        params[f"weight_{n}"] = ingredient["weight"]
    tracker.log_params(params)
    greedy = lineage.get("greedy")
    if greedy:
        scores = {f"score_{n}": s for n, s in enumerate(greedy["individual_scores"])}
        tracker.log({**scores, "soup_score": greedy["soup_score"]}, step=0)
    tracker.log_artifact(result.output_dir / LINEAGE_FILE)
    st_dir = result.output_dir / "sentence_transformers"
    if st_dir.is_dir():
        export_info = json.loads((st_dir / EXPORT_INFO_FILE).read_text())
        prompts = json.loads((st_dir / "config_sentence_transformers.json").read_text())["prompts"]
        tracker.log_sentence_transformers(
            st_dir, "sentence_transformers", {"mrl_dims": export_info["mrl_dims"], "prompts": prompts}
        )
