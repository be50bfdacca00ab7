"""One typed configuration tree for every gemb-dist job, loaded from YAML with dotted overrides.

Each component owns a section (`model`, `loss`, `gradcache`, `optimizer`, `data`, `deepspeed`, `ray`,
`mlflow`, `train`). Unknown keys and bad values are rejected with an error that names the field path
and, where there is a closed set, the allowed values.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending field path."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    """The embedding model: backbone, Matryoshka dims, attention, prompts, dtype."""

    name_or_path: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2",
        description="Hugging Face hub id or local directory of the backbone (or of a saved gemb model).",
    )
    backbone_config: dict[str, Any] | None = Field(
        None,
        description="Build a randomly initialised backbone from this transformers config dict (needs `model_type`) "
        "instead of loading weights; the tokenizer still comes from `tokenizer`.",
    )
    tokenizer: str | None = Field(None, description="Tokenizer path or hub id; defaults to `name_or_path`.")
    mrl_dims: list[int] = Field(
        [768, 1536, 3072],
        description="Matryoshka prefix sizes, ascending; the projection outputs D = max(mrl_dims).",
    )
    attention: Literal["bidirectional", "causal"] = Field(
        "bidirectional", description="Attention of decoder backbones; encoders are always bidirectional."
    )
    max_length: int = Field(512, gt=0, description="Token limit per text; longer texts are truncated and counted.")
    prompts: dict[str, str] = Field(
        default_factory=dict,
        description="Per-task query templates with a `{text}` placeholder, e.g. "
        "{'retrieval': 'task: search result | query: {text}'}. Documents never get a prompt.",
    )
    default_prompt: str = Field(
        "{text}", description="Query template for tasks without an entry in `prompts`; must contain `{text}`."
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Dtype the backbone weights are loaded in.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="transformers attention kernel; None lets transformers choose."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute backbone activations in backward.")
    projection_init: Literal["identity", "random"] = Field(
        "identity",
        description="Initial projection when none is loaded. identity: the first D rows of the identity, zero bias, "
        "so a pretrained sentence embedding model embeds exactly as before training at every MRL dim <= hidden "
        "(rows past the hidden size, D > hidden, get the random init: zero rows would never receive a gradient). "
        "random: nn.Linear's default init, which rotates and rescales a pretrained model's embeddings.",
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model repository.")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if not self.mrl_dims or any(d <= 0 for d in self.mrl_dims):
            raise ValueError("model.mrl_dims must be a non-empty list of positive integers")
        if sorted(set(self.mrl_dims)) != self.mrl_dims:
            raise ValueError(f"model.mrl_dims must be strictly ascending, got {self.mrl_dims}")
        for name, template in {"default_prompt": self.default_prompt, **self.prompts}.items():
            if "{text}" not in template:
                raise ValueError(f"model.prompts[{name!r}] must contain the placeholder '{{text}}': {template!r}")
        return self


class LossConfig(Section):
    """The contrastive (NCE) loss over cosine similarities, per MRL dim."""

    temperature: float = Field(0.05, gt=0, description="Softmax temperature tau over cosine similarities.")
    mrl_weights: list[float] | None = Field(
        None, description="Weight of each MRL dim's loss, same length as model.mrl_dims; None = equal weights."
    )
    mask_duplicates: bool = Field(
        True, description="Mask in-batch negatives whose query or positive text equals the row's (paper's mask)."
    )


class GradCacheConfig(Section):
    """Gradient caching: chunked two-pass encoding, so the global batch does not set activation memory."""

    enabled: bool = Field(True, description="Two-pass gradient caching; activation memory is set by the chunk.")
    chunk_size: int = Field(32, gt=0, description="Most texts encoded in one chunk.")
    chunk_tokens: int | None = Field(
        None, gt=0, description="Token budget of one chunk (padded length x texts); None = count cap only."
    )
    loss_block_size: int = Field(
        256,
        gt=0,
        description="Queries scored at once by the cached loss (the last block of a rank's queries may be "
        "shorter); bounds the similarity matrix to block x global batch.",
    )
    reduction: Literal["step", "chunk"] = Field(
        "chunk",
        description="When gradients are reduced across ranks under ZeRO. `chunk`: DeepSpeed's gradient "
        "accumulation, every chunk's backward is a micro-step; ZeRO-2/3 reduce-scatter each chunk's gradient and "
        "accumulate it in fp32 partitions (gradient memory / world size); ZeRO-0/1 accumulate whole gradients and "
        "reduce once at the step's last chunk. `step`: one coalesced reduction per step, so every rank holds a "
        "full-size gradient until the flush (least communication; refused with bf16, whose coalesced gradients "
        "would accumulate in bf16).",
    )
    zero3_pass1: Literal["per_chunk", "gather_once"] = Field(
        "per_chunk",
        description="ZeRO-3 parameter gathers of pass 1 (the no-grad encode). `per_chunk`: DeepSpeed gathers "
        "each layer for every chunk. `gather_once`: the whole model is gathered once and held for all of pass 1 "
        "(needs the full model's parameters to fit on one device next to one chunk's activations: the engine "
        "refuses it at start-up when they do not; not with deepspeed.offload_params).",
    )


class OptimizerConfig(Section):
    """AdamW and its learning-rate schedule."""

    lr: float = Field(2e-5, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to `lr`.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of `lr`.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm; None disables clipping.")


class DataConfig(Section):
    """The training shards and how they are read: batch size, task mixture, data order."""

    shards: str = Field("", description="Shard directory or manifest: local path, file:// or s3://bucket/prefix.")
    mode: Literal["prefinetune", "finetune"] = Field(
        "prefinetune", description="prefinetune mixes tasks; finetune draws every global batch from one task."
    )
    global_batch_size: int = Field(64, gt=0, description="Queries per optimizer step over all ranks.")
    num_negatives: int = Field(0, ge=0, description="Hard negatives per query (fine-tuning); 0 = none.")
    task_weights: dict[str, float] | None = Field(
        None,
        description="Fine-tuning: the order of an epoch's steps. Each next global step's task is drawn with "
        "probability proportional to its weight among the tasks with steps left, so an epoch still uses every sample "
        "once: the weights set the mixture of the epoch's first part, i.e. of a run shorter than an epoch "
        "(train.max_steps), not of a whole epoch. Weight 0 leaves a task out; None = every step equally likely "
        "(tasks in proportion to their size).",
    )
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes per rank.")
    seed: int = Field(
        0,
        description="Seed of the data order alone: shard order, shuffling and the fine-tuning task schedule "
        "(model init and dropout follow train.seed).",
    )
    shuffle_buffer: int = Field(
        1000,
        ge=0,
        description="Samples shuffled together (a block of the seeded shard order; a worker holds about one block "
        "per task in memory); 0 = shard order only.",
    )
    max_bad_samples: int = Field(
        100,
        ge=0,
        description="Corrupt or invalid samples tolerated per loader worker (each is counted and replaced by "
        "another sample of its batch) before the run fails naming the shard.",
    )
    verify_sha256: bool = Field(True, description="Check shard hashes against the manifest before training.")

    _shards_is_a_location = field_validator("shards")(lambda value: check_location(value))

    @model_validator(mode="after")
    def _check_weights(self) -> DataConfig:
        weights = self.task_weights
        if weights is not None and (any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0):
            raise ValueError(f"data.task_weights must be non-negative with a positive sum, got {weights}")
        return self


class DeepSpeedConfig(Section):
    """The DeepSpeed engine: ZeRO stage, precision, offload, communication buckets."""

    zero_stage: Literal[0, 1, 2, 3] = Field(3, description="ZeRO stage.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Compute and parameter dtype; gradients accumulate, and the loss and rep gradients are computed, "
        "in fp32 either way (DeepSpeed's CPU accelerator runs bf16 too, slowly).",
    )
    offload_optimizer: bool = Field(False, description="ZeRO-Offload of optimizer states to CPU.")
    offload_params: bool = Field(False, description="ZeRO-3 parameter offload to CPU.")
    overlap_comm: bool = Field(True, description="Overlap gradient reduction with backward.")
    reduce_bucket_size: int = Field(50_000_000, gt=0, description="Elements per reduction bucket.")
    stage3_gather_16bit_weights_on_model_save: bool = Field(
        False, description="Gather full weights on save (large models: keep False and consolidate offline)."
    )
    stage3_param_persistence_threshold: int = Field(
        100_000,
        ge=0,
        description="ZeRO-3: parameters with fewer elements stay gathered on every rank (never re-gathered per "
        "chunk); DeepSpeed's default.",
    )
    stage3_max_live_parameters: int = Field(
        1_000_000_000, ge=0, description="ZeRO-3: most gathered parameter elements held at once; DeepSpeed's default."
    )
    stage3_max_reuse_distance: int = Field(
        1_000_000_000,
        ge=0,
        description="ZeRO-3: a gathered parameter needed again within this many elements of other gathers is kept, "
        "not released and re-gathered; DeepSpeed's default.",
    )
    stage3_prefetch_bucket_size: int = Field(
        50_000_000, ge=0, description="ZeRO-3: parameter elements prefetched ahead of use; DeepSpeed's default."
    )


class RayConfig(Section):
    """The Ray Train run: cluster address, workers, resources, run storage."""

    address: str | None = Field(None, description="Ray cluster address; None = the job's cluster or a local one.")
    num_workers: int = Field(2, gt=0, description="Training worker processes (ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1}, description="Ray resources each worker reserves."
    )
    storage_path: str = Field("runs", description="Run storage: local directory or s3:// URI (shared by all nodes).")
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts before the run fails (-1 = unlimited).")

    _storage_is_a_location = field_validator("storage_path")(lambda value: check_location(value))


# Stores MLflow can log to: a tracking server (http, https), a local file or sqlite store, a database backend.
TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")
# Where datasets and runs may live: a local path (no scheme), file:// or s3://.
LOCATION_SCHEMES = ("file", "s3")


def tracking_uri_problem(uri: str) -> str | None:
    """Why `uri` is not an MLflow tracking URI (None when it is): a scheme is required, so `127.0.0.1:5000` is
    refused rather than read as a relative directory named `127.0.0.1:5000`."""
    scheme, sep, rest = uri.partition("://")
    if sep and rest and scheme.split("+")[0].lower() in TRACKING_SCHEMES:
        return None
    allowed = ", ".join(f"{s}://" for s in TRACKING_SCHEMES)
    return f"{uri!r} has no known scheme; use one of {allowed} (e.g. http://127.0.0.1:5000)"


def location_problem(location: str) -> str | None:
    """Why `location` is not a local path, file:// or s3:// URI (None when it is)."""
    scheme, colon, rest = location.partition(":")
    looks_like_url = colon and len(scheme) > 1 and scheme.replace("+", "").replace(".", "").isalnum()
    if not looks_like_url or (scheme in LOCATION_SCHEMES and rest.startswith("//") and len(rest) > 2):
        return None
    return f"{location!r} is not a local path, file:// or s3:// URI (e.g. s3://bucket/prefix)"


def check_location(location: str) -> str:
    """A field validator: `location` unchanged, or ValueError saying which schemes a location may have."""
    if problem := location_problem(location):
        raise ValueError(problem)
    return location


class MLflowConfig(Section):
    """Experiment tracking of every job (training, eval, soup, mining, synthesis): one `mlflow` section type.

    Training jobs add per-step knobs (TrainMLflowConfig); the other jobs log one run each, with their config as
    params and `config.yaml`, their results as metrics and their output files as artifacts.
    """

    tracking_uri: str | None = Field(
        None,
        description="Tracking store URI with its scheme (http://host:5000, https://, sqlite:///path.db, file://); "
        "None = $MLFLOW_TRACKING_URI; when neither is set, training logs to a sqlite store in its run directory "
        "and the other jobs log nothing.",
    )
    experiment: str = Field("gemb-dist", description="MLflow experiment name.")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra run tags.")
    retries: int = Field(
        3, ge=0, description="Retries of a failed MLflow call (exponential backoff) before the job goes on without it."
    )
    retry_backoff_s: float = Field(
        1.0,
        gt=0,
        description="First retry delay, doubled each retry; while the server stays down, a reconnect is "
        "tried every retry_backoff_s * 2**retries seconds and metrics are buffered meanwhile.",
    )
    request_timeout_s: int = Field(
        30, gt=0, description="HTTP timeout of one MLflow request ($MLFLOW_HTTP_REQUEST_TIMEOUT wins when set)."
    )
    flush_timeout_s: float = Field(
        60.0,
        ge=0,
        description="At the end of a job, seconds to wait for a server that is down to take the buffered metrics; "
        "what is left is saved to <run dir>/mlflow_undelivered_metrics.jsonl for `gemb mlflow sync RUN_DIR`.",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _has_scheme(cls, uri: str | None) -> str | None:
        if uri is not None and (problem := tracking_uri_problem(uri)):
            raise ValueError(problem)
        return uri


class TrainMLflowConfig(MLflowConfig):
    """A training job's `mlflow` section: the shared MLflowConfig plus the per-step knobs only training has."""

    log_every: int = Field(1, gt=0, description="Training only: log metrics every N optimizer steps.")
    system_metrics: bool = Field(True, description="Training only: log CPU/GPU/memory system metrics.")
    system_metrics_interval_s: float = Field(
        10.0, gt=0, description="Training only: seconds between system metric samples."
    )


class TrackedJobConfig(Section):
    """Base of the one-process jobs' roots (eval, soup, mining, synthesis): the shared `mlflow` section and the
    name of the one run each job logs."""

    mlflow: MLflowConfig = Field(
        default_factory=MLflowConfig,
        description="Tracking: the job logs one run (config, results, output files) when mlflow.tracking_uri or "
        "$MLFLOW_TRACKING_URI is set, nothing otherwise.",
    )
    run_name: str | None = Field(None, description="MLflow run name; None = '<job>-<name of its output>'.")


class FaultInjection(Section):
    rank: int = Field(1, ge=0, description="Rank that raises.")
    step: int = Field(..., gt=0, description="Step at which it raises (once per run, on the first attempt).")


class TrainConfig(Section):
    """The run itself: stage, name, resume, length, seed of the model, checkpoints."""

    stage: Literal["prefinetune", "finetune"] = Field("prefinetune", description="Training stage.")
    run_name: str | None = Field(
        None,
        description="Run name (Ray Train run under ray.storage_path and MLflow run name); None = a unique "
        "`<stage>-<timestamp>-<random>` name. An existing name is refused unless `resume` is set.",
    )
    resume: bool = Field(
        False, description="Continue the existing run named `run_name` from its latest checkpoint (needs run_name)."
    )
    init_from: str | None = Field(None, description="Fine-tuning: initialise from this gemb model dir.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    epochs: int = Field(1, gt=0, description="Passes over the data (when max_steps is unset or larger).")
    seed: int = Field(
        0,
        description="Seed of the model's random init (projection, random backbones; identical on every rank) and "
        "of each rank's dropout masks (mixed with the rank). The data order is data.seed's alone.",
    )
    log_every: int = Field(1, gt=0, description="Print progress every N steps.")
    checkpoint_every: int = Field(100, gt=0, description="Checkpoint every N steps (and always at the end).")
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept (the newest K).")
    checkpoint_staging_dir: str | None = Field(
        None,
        description="Local directory where each rank writes its checkpoint share before Ray uploads it to "
        "ray.storage_path; None = the system temp directory. Needs room for one rank's share.",
    )
    fault_injection: FaultInjection | None = Field(
        None, description="Tests and chaos drills: raise on `rank` at `step` of the first attempt."
    )

    @model_validator(mode="after")
    def _check_resume(self) -> TrainConfig:
        if self.resume and not self.run_name:
            raise ValueError("train.resume needs train.run_name: the name of the run to continue")
        return self


class GembConfig(Section):
    """The root of a training job's configuration."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    gradcache: GradCacheConfig = Field(default_factory=GradCacheConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: TrainMLflowConfig = Field(default_factory=TrainMLflowConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check_cross_fields(self) -> GembConfig:
        weights = self.loss.mrl_weights
        if weights is not None and len(weights) != len(self.model.mrl_dims):
            raise ValueError(
                f"loss.mrl_weights has {len(weights)} entries but model.mrl_dims has {len(self.model.mrl_dims)}"
            )
        if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
            raise ValueError("loss.mrl_weights must be non-negative with a positive sum")
        if self.data.global_batch_size % self.ray.num_workers:
            raise ValueError(
                f"data.global_batch_size ({self.data.global_batch_size}) must be divisible by "
                f"ray.num_workers ({self.ray.num_workers})"
            )
        _check_engine_combination(self.deepspeed, self.gradcache)
        return self


def _check_engine_combination(ds: DeepSpeedConfig, gc: GradCacheConfig) -> None:
    """Refuse what DeepSpeed 0.19 cannot run (or would run with gradients accumulated in bf16), naming the fields."""
    stage = ds.zero_stage
    if ds.offload_params and stage != 3:
        raise ValueError(f"deepspeed.offload_params needs deepspeed.zero_stage=3, got deepspeed.zero_stage={stage}")
    if ds.offload_optimizer and stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1, got deepspeed.zero_stage=0")
    if gc.zero3_pass1 == "gather_once" and stage != 3:
        raise ValueError(
            f"gradcache.zero3_pass1=gather_once needs deepspeed.zero_stage=3 (got {stage}): only ZeRO-3 partitions "
            "parameters; use gradcache.zero3_pass1=per_chunk"
        )
    if gc.zero3_pass1 == "gather_once" and ds.offload_params:
        raise ValueError(
            "gradcache.zero3_pass1=gather_once cannot be combined with deepspeed.offload_params=true: offloaded "
            "parameters are the ones that do not fit on the device whole"
        )
    if ds.precision != "bf16":
        return
    if stage == 0:
        raise ValueError(
            "deepspeed.precision=bf16 needs deepspeed.zero_stage >= 1: DeepSpeed accumulates bf16 gradients in fp32 "
            "only inside a ZeRO optimizer (stage 0 with fp32 gradient accumulation is not implemented)"
        )
    if gc.reduction == "step":
        # (With ZeRO-1, DeepSpeed would also run its BF16_Optimizer, which rejects coalesced reduction outright.)
        raise ValueError(
            "gradcache.reduction=step with deepspeed.precision=bf16 is refused: the coalesced reduction leaves every "
            "chunk's gradient in the bf16 param.grad until the flush, so gradients would accumulate in bf16; use "
            "gradcache.reduction=chunk (fp32 accumulation)"
        )


def _format_validation_error(err: ValidationError, root: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, e["loc"][:-1])
            msg = f"unknown key; allowed keys: {', '.join(allowed)}"
        lines.append(f"{path}: {msg} (got {e.get('input')!r})" if e["type"] != "extra_forbidden" else f"{path}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _allowed_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    """The keys of the section at `loc` (list indices and Optional wrappers are stepped through)."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):  # an item of a list of sections: the list's field was already resolved
            continue
        field = model.model_fields.get(part)
        sections = _sections_in(field.annotation) if field is not None else []
        if len(sections) != 1:
            return []
        model = sections[0]
    return sorted(model.model_fields)


def _sections_in(annotation: Any) -> list[type[BaseModel]]:
    """The config sections an annotation holds: `X`, `X | None`, `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [section for arg in typing.get_args(annotation) for section in _sections_in(arg)]


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Turn `["loss.temperature=0.02", "ray.num_workers=4"]` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.field=value")
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return nested


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(raw: dict[str, Any], overrides: list[str] | None = None, cls: type[BaseModel] = GembConfig):
    """Validate a raw dict (plus dotted overrides) into `cls`, raising ConfigError naming every bad field."""
    merged = _deep_merge(raw, parse_overrides(overrides))
    try:
        return cls.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, cls)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None, cls: type[BaseModel] = GembConfig):
    """Load a YAML config file (or defaults when `path` is None) and apply `--set` style overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return build_config(raw, overrides, cls)
    except ConfigError as err:
        raise ConfigError(f"{path or '<defaults>'}: {err}") from None


def dump_config(config: BaseModel) -> str:
    """The fully resolved config as YAML (logged with every run)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
