"""The configuration of a soup job: its ingredients, how they are combined, the held-out score greedy soups use."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gemb_dist.config import Section, TrackedJobConfig
from gemb_dist.evaluate import TASK_METRICS


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
