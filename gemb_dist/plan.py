"""Capacity planning: per-rank memory, communication and step time of a config on a cluster, by arithmetic.

Nothing here runs a model or joins a process group. The backbone is built on torch's meta device (shapes only,
no storage) to count its parameters exactly; everything else is closed-form: ZeRO partitioning of model states
(Rajbhandari et al. 2020, arXiv 1910.02054: 2+2+12 bytes a parameter for mixed-precision Adam), transformer
activations per token and layer (Korthikanti et al. 2022, arXiv 2205.05198, extended to gated MLPs and GQA),
ring-collective traffic ((W-1)/W of the buffer per rank) and 2 FLOPs per parameter per token a forward pass.
Besides the textbook terms it counts what DeepSpeed 0.19 and torch's Adam allocate on top (each read in their code
after bench/zero_memory.py's measurements missed it): ZeRO-3's fp32 master partition in fp32 runs, its reduction
bucket kept from init and its flattened gradient copy at the step, Adam's temporaries, and the largest
parameter's dense gradient in flight during backward.
`gemb plan` (gemb_dist/plan_cli.py) prints it; bench/zero_memory.py checks the memory model against real engines.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from gemb_dist.config import GembConfig, ModelConfig

GIB = 2**30
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq in fp32
FP32_MASTER_BYTES = 4  # the fp32 copy a bf16 run's optimizer steps
GRAD_ACCUM_BYTES = 4  # gradients accumulate in fp32 whatever the compute dtype
# [block, B_global] fp32 tensors per MRL dim alive at once: dots, cosines, logits, masked, softmax, gradient.
LOGIT_TENSORS = 6
# DeepSpeed's ZeRO-3 defaults, used when the config does not expose the field.
ZERO3_DEFAULTS = {
    "stage3_param_persistence_threshold": 100_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
}


@dataclass(frozen=True)
class Cluster:
    """The hardware a plan is for: `num_gpus` data-parallel ranks, one per GPU."""

    num_gpus: int
    gpu_memory_gib: float
    bandwidth_gbs: float = 50.0  # collective bus bandwidth per GPU, GB/s (1e9 bytes): 400 Gb/s InfiniBand a GPU
    peak_tflops: float = 989.0  # dense bf16 of an H100 SXM
    mfu: float = 0.4  # fraction of peak the model's matmuls reach
    reserve_gib: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation

    def __post_init__(self) -> None:
        for name in ("num_gpus", "gpu_memory_gib", "bandwidth_gbs", "peak_tflops", "mfu"):
            if getattr(self, name) <= 0:
                raise ValueError(f"cluster: {name} must be positive, got {getattr(self, name)}")
        if self.mfu > 1 or not 0 <= self.reserve_gib < self.gpu_memory_gib:
            raise ValueError(f"cluster: need 0 < mfu <= 1 and 0 <= reserve < GPU memory, got {self.mfu}, "
                             f"{self.reserve_gib} GiB of {self.gpu_memory_gib} GiB")  # fmt: skip

    @property
    def usable_bytes(self) -> float:
        return (self.gpu_memory_gib - self.reserve_gib) * GIB


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need to know about the embedding model (backbone + projection)."""

    param_numels: tuple[int, ...]  # every parameter tensor
    largest_module_numel: int  # the most parameters one module owns directly (ZeRO-3 gathers a module at once)
    embedding_numel: int  # lookup tables: no matmul FLOPs
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    gated_mlp: bool
    rope: bool
    hidden_dropout: bool
    attention_dropout: bool

    @property
    def num_params(self) -> int:
        return sum(self.param_numels)

    def persistent_numel(self, threshold: int) -> int:
        """Elements of the parameters ZeRO-3 keeps whole on every rank (at most `threshold` elements each)."""
        return sum(n for n in self.param_numels if n <= threshold)


def backbone_hf_config(model: ModelConfig):
    """The transformers config of the backbone: `model.backbone_config`, else config.json on local disk."""
    from transformers import AutoConfig

    if model.backbone_config is not None:
        raw = dict(model.backbone_config)
        if "model_type" not in raw:
            raise ValueError("model.backbone_config needs a 'model_type' (e.g. 'qwen2', 'bert')")
        return AutoConfig.for_model(**raw)
    path = Path(model.name_or_path) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"model.name_or_path: {path} not found; `gemb plan` reads the backbone's config.json from local disk "
            "(never downloads): point model.name_or_path at a model directory or set model.backbone_config"
        )
    return AutoConfig.from_pretrained(path.parent, local_files_only=True, trust_remote_code=model.trust_remote_code)


def model_shape(model: ModelConfig) -> ModelShape:
    """Count the embedding model's parameters by building its backbone on the meta device (no memory, no init)."""
    import torch
    from transformers import AutoModel
    from transformers.initialization import no_init_weights

    hf_config = backbone_hf_config(model)
    with torch.device("meta"), no_init_weights():
        backbone = AutoModel.from_config(hf_config, trust_remote_code=model.trust_remote_code)
    text = hf_config.get_text_config()
    hidden, dim = text.hidden_size, max(model.mrl_dims)
    numels = [p.numel() for p in backbone.parameters()] + [hidden * dim, dim]  # + the projection
    direct = [sum(p.numel() for p in m.parameters(recurse=False)) for m in backbone.modules()]
    names = [name for name, _ in backbone.named_parameters()]
    embedding_numel = sum(
        p.numel() for m in backbone.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    )
    return ModelShape(
        param_numels=tuple(numels),
        largest_module_numel=max([*direct, hidden * dim + dim]),
        embedding_numel=embedding_numel,
        num_layers=text.num_hidden_layers,
        hidden=hidden,
        intermediate=getattr(text, "intermediate_size", 4 * hidden),
        num_heads=text.num_attention_heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        head_dim=getattr(text, "head_dim", None) or hidden // text.num_attention_heads,
        gated_mlp=any("gate" in n for n in names),
        rope=not any("position_embeddings" in n for n in names),
        hidden_dropout=float(getattr(text, "hidden_dropout_prob", 0.0) or 0.0) > 0,
        attention_dropout=float(
            getattr(text, "attention_probs_dropout_prob", getattr(text, "attention_dropout", 0.0)) or 0.0
        )
        > 0,
    )


@dataclass(frozen=True)
class Knobs:
    """The settings a plan varies when it looks for one that fits (read from the config by `knobs_from_config`)."""

    num_gpus: int
    zero_stage: int
    reduction: str  # step | chunk
    zero3_pass1: str  # per_chunk | gather_once
    chunk_size: int
    chunk_tokens: int | None
    loss_block_size: int
    gradient_checkpointing: bool
    offload_optimizer: bool
    offload_params: bool
    compute_bytes: int  # 2 (bf16) or 4 (fp32)
    global_batch: int
    num_negatives: int
    max_length: int
    num_mrl_dims: int
    embedding_dim: int
    eager_attention: bool  # attention probabilities materialised ([heads, L, L] per text)
    overlap_comm: bool
    on_gpu: bool  # torch's AdamW steps all tensors at once (foreach) on CUDA, one at a time on CPU
    reduce_bucket_size: int
    persistence_threshold: int
    max_live_parameters: int
    max_reuse_distance: int
    prefetch_bucket_size: int

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.num_gpus

    @property
    def texts_per_chunk(self) -> int:
        by_tokens = self.chunk_size if self.chunk_tokens is None else max(self.chunk_tokens // self.max_length, 1)
        return max(min(self.chunk_size, by_tokens), 1)

    @property
    def num_chunks(self) -> int:
        """Chunks per rank per step when every text is `max_length` tokens long (the worst case)."""
        return math.ceil(self.local_batch * (2 + self.num_negatives) / self.texts_per_chunk)

    @property
    def loss_block(self) -> int:
        return max(b for b in range(1, min(self.local_batch, self.loss_block_size) + 1) if self.local_batch % b == 0)


def knobs_from_config(config: GembConfig, num_gpus: int) -> Knobs:
    """The plan's view of `config` on `num_gpus` ranks; fields another version of the config lacks take defaults."""
    if config.data.global_batch_size % num_gpus:
        raise ValueError(f"data.global_batch_size ({config.data.global_batch_size}) must be divisible by the "
                         f"number of GPUs ({num_gpus})")  # fmt: skip
    gc, ds = config.gradcache, config.deepspeed
    if not gc.enabled:
        raise ValueError("gradcache.enabled=false: `gemb plan` models the gradient-cached step only")
    zero3 = {name: getattr(ds, name, default) for name, default in ZERO3_DEFAULTS.items()}
    return Knobs(
        num_gpus=num_gpus,
        zero_stage=ds.zero_stage,
        reduction=getattr(gc, "reduction", "step"),
        zero3_pass1=getattr(gc, "zero3_pass1", "per_chunk"),
        chunk_size=gc.chunk_size,
        chunk_tokens=gc.chunk_tokens,
        loss_block_size=gc.loss_block_size,
        gradient_checkpointing=config.model.gradient_checkpointing,
        offload_optimizer=ds.offload_optimizer,
        offload_params=ds.offload_params,
        compute_bytes=2 if ds.precision == "bf16" else 4,
        global_batch=config.data.global_batch_size,
        num_negatives=config.data.num_negatives,
        max_length=config.model.max_length,
        num_mrl_dims=len(config.model.mrl_dims),
        embedding_dim=max(config.model.mrl_dims),
        eager_attention=config.model.attn_implementation == "eager",
        overlap_comm=ds.overlap_comm,
        on_gpu=config.ray.use_gpu,
        reduce_bucket_size=ds.reduce_bucket_size,
        persistence_threshold=zero3["stage3_param_persistence_threshold"],
        max_live_parameters=zero3["stage3_max_live_parameters"],
        max_reuse_distance=zero3["stage3_max_reuse_distance"],
        prefetch_bucket_size=zero3["stage3_prefetch_bucket_size"],
    )


@dataclass(frozen=True)
class Memory:
    """Bytes per rank; `peak` is the largest of the step's phases (pass 1, loss, pass 2, optimizer)."""

    params: float  # resident: the ZeRO-3 partition plus persistent parameters, or the whole model
    gathered: float  # ZeRO-3 parameters gathered at once (a few layers per chunk, or the whole model)
    grads: float  # at their largest during the step
    optimizer: float  # Adam moments (+ fp32 master weights in bf16)
    activations: float  # one chunk's forward with grad, plus one layer's backward
    logits: float  # the loss block's [block, B_global] tensors per MRL dim, plus the cached reps and their grads
    buffers: float  # gradient reduction buckets
    grad_in_flight: float  # pass 2: the largest parameter's dense gradient before it is accumulated or reduced
    step_scratch: float  # optimizer step: Adam's temporaries (+ ZeRO-3's flattened copy of the gradient partition)
    peak: float
    peak_phase: str
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # every phase's total; peak is the largest


def layer_activation_bytes_per_token(shape: ModelShape, knobs: Knobs) -> float:
    """Bytes one transformer layer saves for backward per token (Korthikanti et al. 2022, section 4.1, generalised)."""
    h, q, kv = shape.hidden, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    attention = h + (q + 2 * kv) + q + h  # norm/QKV input, Q K V, context (= output-projection input), residual
    if shape.rope:
        attention += q + kv  # rotated Q and K
    mlp = 2 * h + (4 if shape.gated_mlp else 2) * shape.intermediate  # norm + up input; gate/up/act/product
    bytes_ = (attention + mlp) * knobs.compute_bytes + (2 * h if shape.hidden_dropout else 0)  # 1-byte masks
    if knobs.eager_attention:  # scores and probabilities, [heads, L] per token
        probs = 2 * knobs.compute_bytes + (knobs.compute_bytes + 1 if shape.attention_dropout else 0)
        bytes_ += shape.num_heads * knobs.max_length * probs
    return bytes_


def estimate_memory(shape: ModelShape, knobs: Knobs) -> Memory:
    """Per-rank bytes of one gradient-cached step under `knobs`, phase by phase."""
    w, e, p = knobs.num_gpus, knobs.compute_bytes, shape.num_params
    stage, sharded = knobs.zero_stage, knobs.zero_stage >= 1
    persistent = shape.persistent_numel(knobs.persistence_threshold) if stage == 3 else 0
    params = (p - persistent) / w * e + persistent * e if stage == 3 else p * e
    if knobs.offload_params:
        params = persistent * e
    # ZeRO 1-3 step an fp32 clone of their partition even in fp32: stage_1_and_2.py clones it, and stage3.py's
    # no-copy branch compares a tensor's torch.device with the device's *name* (a str), which is never equal.
    optimizer_per_param = ADAM_STATE_BYTES + (FP32_MASTER_BYTES if sharded else 0)
    optimizer = 0.0 if knobs.offload_optimizer else optimizer_per_param * p / (w if sharded else 1)
    # While Adam steps: sqrt(exp_avg_sq) of everything at once (foreach, CUDA), or on CPU tensor by tensor, each
    # taking sqrt(exp_avg_sq) and a divided copy (ZeRO 1-3 step one flat partition; ZeRO-0 the parameters).
    stepped = p / w if sharded else p
    if knobs.offload_optimizer:
        adam_scratch = 0.0
    elif knobs.on_gpu:
        adam_scratch = 4 * stepped
    else:
        adam_scratch = 2 * 4 * (stepped if sharded else max(shape.param_numels))

    grad_partition = GRAD_ACCUM_BYTES * p / w if stage >= 2 else 0.0
    if stage <= 1:
        grads_pass2 = GRAD_ACCUM_BYTES * p  # whole gradients until the step's one reduction
    elif knobs.reduction == "step":
        grads_pass2 = e * p + grad_partition  # whole-size param.grad until the flush, which fills the partition
    else:
        grads_pass2 = grad_partition
    resident_grads = grad_partition if stage == 3 else 0.0  # ZeRO-3 keeps its flat partition buffer allocated
    # The flush reduce-scatters ZeRO-2/3's whole-size gradients and frees them; ZeRO-0/1 step on whole ones.
    grads_optimizer = grad_partition if stage >= 2 else grads_pass2
    # stage3.py steps a flattened copy of the gradient partition beside the partition buffer
    step_scratch = adam_scratch + (GRAD_ACCUM_BYTES * p / w if stage == 3 else 0.0)
    # Autograd materialises a parameter's whole dense gradient (an embedding table's too) before it is accumulated
    # or reduced: the largest one is in flight on top of the accumulated gradients.
    grad_in_flight = e * max(shape.param_numels)
    # ZeRO-3 allocates one contiguous bucket at init and keeps it; ZeRO-1/2 allocate theirs (a second one under
    # overlap_comm) for each backward and free them after. On CPU, untouched pages of a bucket larger than the
    # model never count.
    num_buckets = 1 if stage == 3 or not knobs.overlap_comm else 2
    bucket_numel = knobs.reduce_bucket_size if knobs.on_gpu else min(knobs.reduce_bucket_size, p)
    buffers = bucket_numel * e * num_buckets if sharded else 0.0
    resident_buffers = buffers if stage == 3 else 0.0

    if stage == 3:
        prefetch = shape.largest_module_numel + knobs.prefetch_bucket_size
        # Gathered layers stay live while they are reused within the reuse distance, up to max_live_parameters.
        kept = min(knobs.max_reuse_distance, knobs.max_live_parameters)
        gathered_pass2 = min(p - persistent, max(prefetch, kept)) * e
        gathered_pass1 = (p - persistent) * e if knobs.zero3_pass1 == "gather_once" else gathered_pass2
    else:
        gathered_pass1 = gathered_pass2 = 0.0

    tokens = knobs.texts_per_chunk * knobs.max_length
    per_layer = layer_activation_bytes_per_token(shape, knobs) * tokens
    final_states = tokens * shape.hidden * 4 * 2  # last hidden state and its fp32 copy for pooling
    if knobs.gradient_checkpointing:
        activations = shape.num_layers * tokens * shape.hidden * e + 2 * per_layer + final_states
    else:
        activations = (shape.num_layers + 1) * per_layer + final_states
    activations_nograd = 2 * per_layer + final_states  # inference frees each layer's inputs as it goes

    b_local, b_global, d = knobs.local_batch, knobs.global_batch, knobs.embedding_dim
    reps = (b_local * (2 + knobs.num_negatives) + b_global) * d * 4 * 2  # local reps + gathered positives, + grads
    scores = LOGIT_TENSORS * knobs.num_mrl_dims * knobs.loss_block * (b_global + knobs.num_negatives) * 4
    logits = reps + scores

    base = params + optimizer + resident_buffers
    pass2 = grads_pass2 + grad_in_flight + gathered_pass2 + activations + reps + buffers - resident_buffers
    phases = {
        "pass 1": base + resident_grads + gathered_pass1 + activations_nograd + reps,
        "loss": base + resident_grads + logits,
        "pass 2": base + pass2,
        "optimizer": base + grads_optimizer + step_scratch,
    }
    peak_phase = max(phases, key=phases.__getitem__)
    return Memory(
        params=params,
        gathered=max(gathered_pass1, gathered_pass2),
        grads=grads_pass2,
        optimizer=optimizer,
        activations=activations,
        logits=logits,
        buffers=buffers,
        grad_in_flight=grad_in_flight,
        step_scratch=step_scratch,
        peak=phases[peak_phase],
        peak_phase=peak_phase,
        phases=phases,
    )


@dataclass(frozen=True)
class Traffic:
    """Bytes each rank receives per step, by collective (ring algorithms: (W-1)/W of the buffer)."""

    param_gathers: float  # ZeRO-3: pass 1, and pass 2's forward and backward, per chunk
    num_param_gathers: int
    grad_reduction: float  # reduce-scatter (ZeRO-2/3) or all-reduce (ZeRO-0/1) of the gradient
    num_grad_reductions: int
    param_allgather: float  # ZeRO-1/2: updated partitions back to every rank after the step
    reps: float  # positives' all-gather, its backward, and the text keys

    @property
    def total(self) -> float:
        return self.param_gathers + self.grad_reduction + self.param_allgather + self.reps


def estimate_traffic(shape: ModelShape, knobs: Knobs) -> Traffic:
    w, e, p = knobs.num_gpus, knobs.compute_bytes, shape.num_params
    ring = (w - 1) / w
    gathers = 0
    if knobs.zero_stage == 3 and w > 1:
        # An upper bound: parameters kept within the reuse distance skip some of pass 2's backward gathers.
        gathers = (1 if knobs.zero3_pass1 == "gather_once" else knobs.num_chunks) + 2 * knobs.num_chunks
    gathered = (p - shape.persistent_numel(knobs.persistence_threshold)) * e * ring * gathers
    reductions = knobs.num_chunks if knobs.reduction == "chunk" and knobs.zero_stage >= 2 else 1
    per_reduction = p * e * ring * (1 if knobs.zero_stage >= 2 else 2)
    allgather = p * e * ring if knobs.zero_stage in (1, 2) else 0.0
    reps = (w - 1) * knobs.local_batch * (2 * knobs.embedding_dim * 4 + 2 * 8)
    return Traffic(
        param_gathers=gathered,
        num_param_gathers=gathers,
        grad_reduction=per_reduction * reductions if w > 1 else 0.0,
        num_grad_reductions=reductions,
        param_allgather=allgather if w > 1 else 0.0,
        reps=float(reps),
    )


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    comm_s: float

    @property
    def overlapped_s(self) -> float:  # communication fully hidden behind compute
        return max(self.compute_s, self.comm_s)

    @property
    def serial_s(self) -> float:  # nothing overlapped
        return self.compute_s + self.comm_s


def estimate_time(shape: ModelShape, knobs: Knobs, traffic: Traffic, cluster: Cluster) -> StepTime:
    """Matmul FLOPs of pass 1 (forward), pass 2 (forward + 2x backward) and a recompute under checkpointing."""
    attention = 4 * shape.num_layers * knobs.max_length * shape.hidden  # QK^T and AV, per token
    forward_per_token = 2 * (shape.num_params - shape.embedding_numel) + attention
    tokens = knobs.local_batch * (2 + knobs.num_negatives) * knobs.max_length
    passes = 4 + (1 if knobs.gradient_checkpointing else 0)
    loss = 3 * 2 * knobs.local_batch * knobs.global_batch * knobs.embedding_dim
    flops = forward_per_token * tokens * passes + loss
    return StepTime(
        compute_s=flops / (cluster.peak_tflops * 1e12 * cluster.mfu),
        comm_s=traffic.total / (cluster.bandwidth_gbs * 1e9),
    )


@dataclass(frozen=True)
class Plan:
    knobs: Knobs
    memory: Memory
    traffic: Traffic
    time: StepTime
    fits: bool


def make_plan(shape: ModelShape, knobs: Knobs, cluster: Cluster) -> Plan:
    memory = estimate_memory(shape, knobs)
    traffic = estimate_traffic(shape, knobs)
    return Plan(
        knobs, memory, traffic, estimate_time(shape, knobs, traffic, cluster), memory.peak <= cluster.usable_bytes
    )


def fixes(shape: ModelShape, knobs: Knobs, cluster: Cluster) -> list[tuple[str, Plan]]:
    """Single-knob changes that make a plan fit, most preferred first (`--gpus` last: it changes the cluster)."""
    candidates: list[tuple[str, Knobs]] = []
    if knobs.reduction == "step" and knobs.zero_stage >= 2:
        candidates.append(("gradcache.reduction=chunk", dataclasses.replace(knobs, reduction="chunk")))
    if knobs.zero3_pass1 == "gather_once":
        candidates.append(("gradcache.zero3_pass1=per_chunk", dataclasses.replace(knobs, zero3_pass1="per_chunk")))
    if knobs.zero_stage < 3:
        candidates.append(("deepspeed.zero_stage=3", dataclasses.replace(knobs, zero_stage=3)))
    if not knobs.gradient_checkpointing:
        candidates.append(
            ("model.gradient_checkpointing=true", dataclasses.replace(knobs, gradient_checkpointing=True))
        )
    for name, field in (("gradcache.chunk_size", "chunk_size"), ("gradcache.loss_block_size", "loss_block_size")):
        value = getattr(knobs, field) // 2
        while value >= 1:  # the largest power-of-two fraction that fits
            changed = dataclasses.replace(knobs, **{field: value})
            if make_plan(shape, changed, cluster).fits:
                candidates.append((f"{name}={value}", changed))
                break
            value //= 2
    if knobs.zero_stage >= 1 and not knobs.offload_optimizer:
        candidates.append(("deepspeed.offload_optimizer=true", dataclasses.replace(knobs, offload_optimizer=True)))
    for gpus in range(knobs.num_gpus + 1, min(knobs.global_batch, 65536) + 1):
        if knobs.global_batch % gpus == 0:
            more = dataclasses.replace(knobs, num_gpus=gpus)
            if make_plan(shape, more, cluster).fits:
                candidates.append((f"--gpus {gpus}", more))
                break
    plans = [(name, make_plan(shape, k, cluster)) for name, k in candidates]
    return [(name, plan) for name, plan in plans if plan.fits]
