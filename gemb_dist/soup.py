"""Model soups: parameter averages of fine-tuned checkpoints (uniform, weighted, or greedy by a held-out score).

Ingredients are saved gemb model dirs, DeepSpeed ZeRO checkpoints (consolidated first) or MLflow runs whose
artifacts hold a gemb model dir. Averaging streams one tensor key at a time: each ingredient file is opened
with `safe_open`, the one tensor is read and added into a float64 accumulator, the file is closed, and the
averaged tensor is appended to an output file whose safetensors header was written up front. Peak memory is
therefore about three copies of the largest tensor, whatever the number of ingredients.

A `zero_checkpoint` ingredient is consolidated with `deepspeed.utils.zero_to_fp32` and is either
- a checkpoint of a gemb training run (`trainer.json` with the run's config beside `deepspeed/`), consolidated
  by `gemb_dist.train.checkpoint.consolidate_checkpoint`, or
- a bare DeepSpeed save dir (the `save_dir` given to `engine.save_checkpoint`: `latest` and `<tag>/` folders)
  with the model's non-weight files (`gemb_config.json`, backbone `config.json`, tokenizer files: a gemb model dir
  without `model.safetensors`) in that dir or its parent; it is streamed tensor by tensor, the `backbone.*` /
  `projection.*` parameter names of the trained `EmbeddingModel` mapped to those of a saved model dir.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, model_validator
from safetensors import safe_open

from gemb_dist.config import Section, TrackedJobConfig
from gemb_dist.evaluate import TASK_METRICS
from gemb_dist.export import EXPORT_INFO_FILE
from gemb_dist.files import atomic_dir, atomic_file
from gemb_dist.model import BACKBONE_CONFIG_NAME, GEMB_CONFIG_NAME, PROJECTION_KEYS, WEIGHTS_NAME
from gemb_dist.train.tracking import Tracker, configured_tracking_uri, job_tracker

# Fields of config.json that record where or with which library version a model was saved, not what it is.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash"}
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}
LINEAGE_FILE = "soup.json"


# ------------------------------------------------------------------------------------------------ config
class IngredientConfig(Section):
    path: str | None = Field(None, description="A saved gemb model dir.")
    zero_checkpoint: str | None = Field(
        None, description="A DeepSpeed ZeRO checkpoint dir; gemb_config.json etc. must be in it or its parent."
    )
    mlflow_run_id: str | None = Field(None, description="An MLflow run whose artifact `artifact_path` is a model dir.")
    artifact_path: str = Field("model", description="Artifact path of the model dir inside the MLflow run.")
    tag: str | None = Field(None, description="ZeRO checkpoint tag; None = the one named in the `latest` file.")
    weight: float | None = Field(None, gt=0, description="Weight of this ingredient (method=weighted only).")

    @model_validator(mode="after")
    def _one_source(self) -> IngredientConfig:
        given = [k for k in ("path", "zero_checkpoint", "mlflow_run_id") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"set exactly one of path, zero_checkpoint, mlflow_run_id (got {given or 'none'})")
        return self

    @property
    def label(self) -> str:
        return self.path or self.zero_checkpoint or f"mlflow:{self.mlflow_run_id}/{self.artifact_path}"


class HeldOutConfig(Section):
    sts: str | None = Field(None, description="STS file (csv/tsv/jsonl with sentence1, sentence2, score).")
    retrieval: str | None = Field(None, description="BEIR-layout dir (corpus.jsonl, queries.jsonl, qrels/test.tsv).")
    classification: str | None = Field(None, description="'TRAIN,TEST' CSV files with text,label.")
    clustering: str | None = Field(None, description="CSV with text,label.")
    pairs: str | None = Field(None, description="CSV with sentence1,sentence2,label.")
    metric: str = Field(
        "sts.spearman",
        description="`task.metric` that greedy soup maximises, e.g. retrieval.ndcg_at_10; only "
        "that task's file is evaluated.",
    )
    dim: int | None = Field(None, gt=0, description="MRL dim the score is computed at; None = the full dim.")
    batch_size: int = Field(32, gt=0, description="Encoding batch size.")

    @model_validator(mode="after")
    def _metric_names_a_task(self) -> HeldOutConfig:
        task, _, metric = self.metric.partition(".")
        if task not in TASK_METRICS or metric not in TASK_METRICS[task]:
            known = [f"{t}.{m}" for t, names in TASK_METRICS.items() for m in names]
            raise ValueError(f"metric {self.metric!r} is not one of {known}")
        if getattr(self, task) is None:
            raise ValueError(f"metric {self.metric!r} needs held_out.{task} to name a file")
        return self


class SoupConfig(TrackedJobConfig):
    """The configuration of a soup job (`jobs/soup.py`)."""

    ingredients: list[IngredientConfig] = Field(..., min_length=1, description="Checkpoints to average.")
    method: Literal["uniform", "weighted", "greedy"] = Field("uniform", description="How ingredients are combined.")
    held_out: HeldOutConfig | None = Field(None, description="Held-out evaluation that ranks ingredients (greedy).")
    output_dir: str = Field(..., description="Gemb model dir written (atomically) with the soup.")
    overwrite: bool = Field(False, description="Replace an existing output_dir.")
    export_sentence_transformers: bool = Field(
        True, description="Also write the sentence-transformers export under output_dir/sentence_transformers."
    )
    use_ray: bool = Field(
        True,
        description="Make the soup in one Ray task on a cluster node (joining the job's cluster); false = in this "
        "process (`jobs/soup.py --no-ray`).",
    )
    num_cpus: float = Field(1, gt=0, description="CPUs reserved by the Ray task that makes the soup.")

    @model_validator(mode="after")
    def _check(self) -> SoupConfig:
        weights = [i.weight for i in self.ingredients]
        if self.method == "weighted" and any(w is None for w in weights):
            missing = [n for n, w in enumerate(weights) if w is None]
            raise ValueError(f"method=weighted needs a weight on every ingredient; missing at ingredients {missing}")
        if self.method != "weighted" and any(w is not None for w in weights):
            raise ValueError(f"ingredient weights are only used by method=weighted (method is {self.method})")
        if self.method == "greedy" and self.held_out is None:
            raise ValueError("method=greedy needs a held_out section (the score it maximises)")
        return self


# ------------------------------------------------------------------------------------------------ checks
@dataclass(frozen=True)
class TensorSpec:
    key: str
    dtype: str  # safetensors dtype name, e.g. F32
    shape: tuple[int, ...]

    @property
    def num_bytes(self) -> int:
        return math.prod(self.shape) * _ST_DTYPES[self.dtype].itemsize


def read_tensor_specs(path: str | os.PathLike) -> list[TensorSpec]:
    """Keys, dtypes and shapes of a safetensors file (header only, no tensor data is read)."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: safetensors file not found")
    with safe_open(str(path), framework="pt") as f:
        specs = []
        for key in sorted(f.keys()):
            part = f.get_slice(key)
            specs.append(TensorSpec(key, part.get_dtype(), tuple(part.get_shape())))
    unknown = [s for s in specs if s.dtype not in _ST_DTYPES]
    if unknown:
        raise ValueError(f"{path}: tensor {unknown[0].key!r} has dtype {unknown[0].dtype}, which soups do not support")
    return specs


def check_same_tensors(paths: Sequence[str | os.PathLike]) -> list[TensorSpec]:
    """The common tensor specs of all files; ValueError naming the first file and key that differ."""
    reference = read_tensor_specs(paths[0])
    by_key = {s.key: s for s in reference}
    for path in paths[1:]:
        specs = {s.key: s for s in read_tensor_specs(path)}
        for key in sorted(set(by_key) | set(specs)):
            if key not in specs:
                raise ValueError(f"{path}: tensor {key!r} is missing (present in {paths[0]})")
            if key not in by_key:
                raise ValueError(f"{path}: tensor {key!r} is not in {paths[0]}")
            ours, theirs = by_key[key], specs[key]
            if ours.shape != theirs.shape:
                raise ValueError(
                    f"{path}: tensor {key!r} has shape {list(theirs.shape)}, {paths[0]} has {list(ours.shape)}"
                )
            if ours.dtype != theirs.dtype:
                raise ValueError(f"{path}: tensor {key!r} has dtype {theirs.dtype}, {paths[0]} has {ours.dtype}")
    return reference


def _architecture(model_dir: Path) -> dict[str, Any]:
    out = {}
    for name in (BACKBONE_CONFIG_NAME, GEMB_CONFIG_NAME):
        path = model_dir / name
        if not path.is_file():
            raise ValueError(f"{path}: missing; {model_dir} is not a gemb model dir")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
        out.update({f"{name}:{k}": v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS})
    return out


def check_same_architecture(model_dirs: Sequence[Path]) -> None:
    """ValueError naming the first config field where an ingredient differs from the first one."""
    reference = _architecture(model_dirs[0])
    for model_dir in model_dirs[1:]:
        other = _architecture(model_dir)
        for key in sorted(set(reference) | set(other)):
            if reference.get(key, "<absent>") != other.get(key, "<absent>"):
                file, _, name = key.partition(":")
                raise ValueError(
                    f"{model_dir / file}: field {name!r} is {other.get(key, '<absent>')!r} but "
                    f"{model_dirs[0] / file} has {reference.get(key, '<absent>')!r}; "
                    "ingredients must share one architecture"
                )


# ------------------------------------------------------------------------------------------------ averaging
def write_safetensors_streaming(
    out_path: str | os.PathLike,
    specs: Sequence[TensorSpec],
    tensors: Iterator[torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file (atomically) whose tensors arrive one at a time, in `specs` order.

    `safetensors.torch.save_file` needs every tensor in memory at once; the format is simple enough (8-byte
    little-endian header size, JSON header with byte offsets, raw little-endian data) to write the header from
    the known shapes first and then append each tensor's bytes as it is produced.
    """
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.key] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.num_bytes],
        }
        offset += spec.num_bytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with atomic_file(out_path) as f:  # renamed into place only once complete
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for spec in specs:
            tensor = next(tensors)
            assert _DTYPE_NAMES[tensor.dtype] == spec.dtype and tuple(tensor.shape) == spec.shape, spec
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        if next(tensors, None) is not None:
            raise AssertionError("more tensors than specs")


def _read_tensor(path: str | os.PathLike, key: str) -> torch.Tensor:
    # Open per tensor: a handle kept open keeps every page read so far mapped, so resident memory would grow
    # with the number of ingredients; closing releases the mapping.
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def _averaged_tensors(paths: Sequence[str], specs: Sequence[TensorSpec], weights: Sequence[float]):
    total = math.fsum(weights)
    for spec in specs:
        dtype = _ST_DTYPES[spec.dtype]
        if not dtype.is_floating_point:  # integer buffers (e.g. position ids) cannot be averaged: must agree
            first = _read_tensor(paths[0], spec.key)
            for path in paths[1:]:
                if not torch.equal(first, _read_tensor(path, spec.key)):
                    raise ValueError(f"{path}: integer tensor {spec.key!r} differs from {paths[0]}; cannot average it")
            yield first
            continue
        acc = torch.zeros(spec.shape, dtype=torch.float64)
        for path, weight in zip(paths, weights, strict=True):
            acc += _read_tensor(path, spec.key).to(torch.float64).mul_(weight)
        yield acc.div_(total).to(dtype)
        del acc


def average_state_dicts(
    paths: Sequence[str | os.PathLike], weights: Sequence[float] | None, out_path: str | os.PathLike
) -> None:
    """Write sum_i(w_i * t_i) / sum_i(w_i) of every tensor of the safetensors `paths` to `out_path`.

    Sums run in float64 and are cast back to the ingredients' dtype. All files must have the same keys,
    shapes and dtypes (ValueError naming the first mismatch); integer tensors must be identical.
    Memory stays bounded by a few copies of the largest tensor, independent of the number of ingredients.
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("average_state_dicts needs at least one ingredient")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise ValueError(f"{len(weights)} weights for {len(paths)} ingredients")
    if any(not math.isfinite(w) or w < 0 for w in weights) or math.fsum(weights) <= 0:
        raise ValueError(f"weights must be finite, non-negative and sum to a positive number: {weights}")
    specs = check_same_tensors(paths)
    write_safetensors_streaming(out_path, specs, _averaged_tensors(paths, specs, weights))


def average_model_dirs(model_dirs: Sequence[Path], weights: Sequence[float] | None, out_dir: Path) -> None:
    """Write a gemb model dir into the existing `out_dir`: averaged weights, other files from the first dir."""
    check_same_architecture(model_dirs)
    average_state_dicts([d / WEIGHTS_NAME for d in model_dirs], weights, out_dir / WEIGHTS_NAME)
    _copy_model_files(model_dirs[0], out_dir)


def _copy_model_files(source: Path, out_dir: Path) -> None:
    """Copy the configs and tokenizer files of a model dir (not its weights, nor DeepSpeed's `latest`/scripts)."""
    for item in source.iterdir():
        if item.is_file() and item.name not in (WEIGHTS_NAME, "latest") and item.suffix not in (".py", ".pt"):
            shutil.copy2(item, out_dir / item.name)


# ------------------------------------------------------------------------------------------------ greedy
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


# ------------------------------------------------------------------------------------------------ ingredients
def consolidate_zero_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: Path, tag: str | None = None) -> Path:
    """Turn a ZeRO checkpoint of an `EmbeddingModel` into a gemb model dir at `out_dir` (must not exist)."""
    from gemb_dist.train.safe_load import safe_zero_to_fp32

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ValueError(f"zero_checkpoint {checkpoint_dir}: directory not found")
    if (checkpoint_dir / "trainer.json").is_file():  # a checkpoint of a gemb training run: it knows its config
        from gemb_dist.config import build_config
        from gemb_dist.train.checkpoint import consolidate_checkpoint

        trainer = json.loads((checkpoint_dir / "trainer.json").read_text())
        return consolidate_checkpoint(checkpoint_dir, build_config(yaml.safe_load(trainer["config"])), out_dir)
    source = next((d for d in (checkpoint_dir, checkpoint_dir.parent) if (d / GEMB_CONFIG_NAME).is_file()), None)
    if source is None:
        raise ValueError(
            f"zero_checkpoint {checkpoint_dir}: no {GEMB_CONFIG_NAME} in it or its parent; the model's config.json, "
            f"{GEMB_CONFIG_NAME} and tokenizer files must be saved next to the checkpoint"
        )
    state = safe_zero_to_fp32(str(checkpoint_dir), tag=tag, lazy_mode=True)  # weights-only torch.load
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        json.loads((source / GEMB_CONFIG_NAME).read_text()).get("dtype", "float32")
    ]
    names = {}
    for name in state:
        if name.startswith("backbone."):
            names[name] = name.removeprefix("backbone.")
        elif name in PROJECTION_KEYS:
            names[name] = name
        else:
            raise ValueError(f"zero_checkpoint {checkpoint_dir}: parameter {name!r} is not part of an EmbeddingModel")

    def cast(tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        return tensor.to(dtype) if tensor.dtype.is_floating_point else tensor

    order = sorted(names, key=names.get)
    specs = [
        TensorSpec(
            names[n], _DTYPE_NAMES[dtype if state[n].dtype.is_floating_point else state[n].dtype], tuple(state[n].shape)
        )
        for n in order
    ]
    out_dir.mkdir(parents=True)
    write_safetensors_streaming(out_dir / WEIGHTS_NAME, specs, (cast(state[n]) for n in order))
    _copy_model_files(source, out_dir)
    return out_dir


def resolve_ingredient(ingredient: IngredientConfig, scratch: Path, index: int, tracking_uri: str | None) -> Path:
    """A local gemb model dir for one ingredient (consolidating or downloading into `scratch` when needed)."""
    if ingredient.path is not None:
        path = Path(ingredient.path)
        if not (path / WEIGHTS_NAME).is_file():
            raise ValueError(f"ingredients[{index}].path: {path / WEIGHTS_NAME} not found; not a gemb model dir")
        return path
    if ingredient.zero_checkpoint is not None:
        return consolidate_zero_checkpoint(ingredient.zero_checkpoint, scratch / f"ingredient-{index}", ingredient.tag)
    import mlflow.artifacts

    dst = scratch / f"ingredient-{index}-download"
    dst.mkdir(parents=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=ingredient.mlflow_run_id,
            artifact_path=ingredient.artifact_path,
            dst_path=str(dst),
            tracking_uri=tracking_uri,
        )
    except Exception as err:  # MLflow raises its own exception types for unknown runs and paths
        raise ValueError(f"ingredients[{index}]: cannot download {ingredient.label}: {err}") from None
    if not (Path(local) / WEIGHTS_NAME).is_file():
        raise ValueError(
            f"ingredients[{index}]: artifact {ingredient.label} is not a gemb model dir (no {WEIGHTS_NAME})"
        )
    return Path(local)


# ------------------------------------------------------------------------------------------------ the job
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
