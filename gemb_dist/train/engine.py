"""The training engine, picked once: an EmbeddingModel inside DeepSpeed (ZeRO 0-3) with a torch AdamW.

`train_step` runs the gradient cache over one rank's share of the global batch with the engine's own
`backward`, reduces the chunks' gradients as `gradcache.reduction` says (DeepSpeed micro-steps, the last chunk
the accumulation boundary; or one coalesced reduction) and takes ONE optimizer step. Because DeepSpeed averages
gradients over ranks and each rank's loss is the mean over its own queries (scored against the gathered global
batch), the update equals one process training on the whole batch. A non-finite rep, loss or gradient on any
rank stops every rank with the same `NonFiniteError`, naming the step and the ranks that saw it (for a gradient:
the ranks whose backward produced it, checked before DeepSpeed reduces it).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from gemb_dist.batch import TextBatch, TrainBatch
from gemb_dist.config import GembConfig
from gemb_dist.distributed import NonFiniteError, get_rank, raise_if_any_rank
from gemb_dist.gradcache import GradCache
from gemb_dist.model import EmbeddingModel, is_gemb_dir
from gemb_dist.train.deepspeed_config import build_deepspeed_config
from gemb_dist.train.schedule import build_lr_scheduler


def init_deepspeed_distributed(use_gpu: bool, local_rank: int) -> None:
    """Join DeepSpeed to the process group the launcher (Ray Train, torchrun) already created."""
    import deepspeed

    os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeed's engine insists on reading it

    if not use_gpu:
        # Otherwise DeepSpeed JIT-compiles its shared-memory CPU collective (~30 s per process) at init.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


@dataclass
class LoadedModel:
    """A model built for a DeepSpeed run, plus what must outlive it."""

    model: EmbeddingModel
    # transformers keeps only a weak reference to this; while it lives, from_pretrained/from_config partition
    # every parameter across ranks as it is created (ZeRO-3), so no rank ever holds the full model. TrainEngine
    # drops it once DeepSpeed has taken the model.
    zero3_init_config: Any = None


def load_model(config: GembConfig, world_size: int) -> LoadedModel:
    """Build the model of `config` (or `train.init_from`), partitioned at load under ZeRO-3.

    Every rank must call this together under ZeRO-3. A saved gemb directory is loaded whole and partitioned
    by `deepspeed.initialize` instead: its loader copies a full state dict into the backbone.
    """
    model_config = config.model
    if config.train.init_from:
        model_config = model_config.model_copy(update={"name_or_path": config.train.init_from, "backbone_config": None})
    zero3_init_config = None
    if config.deepspeed.zero_stage == 3 and not is_gemb_dir(model_config.name_or_path):
        from transformers.integrations import HfDeepSpeedConfig

        zero3_init_config = HfDeepSpeedConfig(build_deepspeed_config(config, world_size))
    torch.manual_seed(config.train.seed)  # identical random init on every rank
    return LoadedModel(EmbeddingModel.from_config(model_config), zero3_init_config)


# Any id no DeepSpeed module has (theirs count up from 0): marks parameters held gathered for pass 1.
_PASS1_HOLDER = -1
# Fraction of free device memory the whole gathered model may take for `gather_once`; the rest is for one chunk's
# no-grad activations and everything ZeRO-3 already holds (partitions, optimizer state).
_GATHER_ONCE_MAX_FRACTION = 0.5


def rank_seed(seed: int, rank: int) -> int:
    """The seed of `rank`'s dropout after the identical init: distinct per rank and per run seed."""
    return (seed * 1_000_003 + rank + 1) % 2**63


def _check_full_model_fits(module: torch.nn.Module, device: torch.device) -> None:
    """Refuse `gather_once` when the whole model would take more than half the memory left on the device."""
    full_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in module.parameters())
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:  # host memory not in use (Linux)
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if full_bytes > _GATHER_ONCE_MAX_FRACTION * free:
        raise ValueError(
            f"gradcache.zero3_pass1=gather_once: the whole model takes {full_bytes / 2**30:.1f} GiB gathered, more "
            f"than {_GATHER_ONCE_MAX_FRACTION:.0%} of the {free / 2**30:.1f} GiB free on {device}; use "
            "gradcache.zero3_pass1=per_chunk"
        )


class GradientWatch:
    """Flags a non-finite gradient on the rank whose backward produced it, before any reduction can spread it.

    A tensor hook on a parameter sees each incoming gradient before autograd accumulates it. DeepSpeed reduces,
    partitions and offloads gradients only after that: ZeRO 1-3 and the BF16_Optimizer in post-accumulate hooks,
    ZeRO-0 in one all-reduce at the boundary. So this sees the whole of every gradient this rank computes, in every
    stage, dtype and offload setting, while each ZeRO partition after the reduction holds only its share of every
    rank's gradient. (A sum of finite gradients overflows only near 3e38, fp32 and bf16 alike; not checked.)
    The flag stays on the device: no host synchronisation per gradient.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self._bad: torch.Tensor | None = None
        self._handles = [p.register_hook(self._see) for p in params]

    def _see(self, grad: torch.Tensor) -> None:
        bad = ~torch.isfinite(grad).all()
        self._bad = bad if self._bad is None else self._bad | bad

    def pop(self) -> bool:
        """Whether a non-finite gradient arrived since the last call (one host sync); clears the flag."""
        bad, self._bad = self._bad, None
        return bad is not None and bool(bad)


@dataclass
class StepMetrics:
    """What one optimizer step measured on this rank (the loop reduces and logs them)."""

    loss: float
    per_dim_loss: dict[int, float]
    per_dim_accuracy: dict[int, float]
    lr: float
    grad_norm: float
    num_examples: int
    num_tokens: int
    seconds: dict[str, float]  # encode, loss, backward, optimizer


class TrainEngine:
    """One interface over DeepSpeed for every ZeRO stage; built once per worker."""

    def __init__(self, config: GembConfig, loaded: LoadedModel, total_steps: int, world_size: int):
        import deepspeed

        self.config = config
        self.total_steps = total_steps
        self.model = loaded.model
        optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=config.optimizer.lr,
            betas=config.optimizer.betas,
            eps=config.optimizer.eps,
            weight_decay=config.optimizer.weight_decay,
        )
        self.ds_config = build_deepspeed_config(config, world_size)
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=self.model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: build_lr_scheduler(opt, config.optimizer, total_steps),
            config=self.ds_config,
        )
        # The model is built and partitioned: from here on a model built in this process (the weightless one
        # that consolidation writes its config files from, on rank 0 alone) must not enter zero.Init, whose
        # per-parameter broadcast would wait forever for the other ranks.
        if loaded.zero3_init_config is not None:
            from transformers.integrations import unset_hf_deepspeed_config

            loaded.zero3_init_config = None
            unset_hf_deepspeed_config()
        self.device = self.engine.device
        self._grad_watch = GradientWatch(p for p in self.engine.module.parameters() if p.requires_grad)
        self.reduction = config.gradcache.reduction
        if config.gradcache.zero3_pass1 == "gather_once":
            _check_full_model_fits(self.engine.module, self.device)
        self.grad_cache = GradCache.from_config(
            config,
            self._encode,
            backward=self._backward,
            backward_context=self._one_reduction if self.reduction == "step" else None,
            pass1_context=self._gather_once if config.gradcache.zero3_pass1 == "gather_once" else None,
        )
        # Identical init above; from here on each rank draws its own dropout masks (and the cache replays them).
        torch.manual_seed(rank_seed(config.train.seed, get_rank()))

    # ---------------------------------------------------------------- one optimizer step
    def train_step(self, batch: TrainBatch) -> StepMetrics:
        """Gradient-cached forward/backward over `batch` (this rank's share) and one optimizer step."""
        self.engine.train()
        lr = self.current_lr()  # the lr this step applies (the scheduler advances inside engine.step)
        step = self.global_step + 1
        try:
            out = self.grad_cache.step(batch)
            raise_if_any_rank(self._grad_watch.pop(), "gradient")
        except NonFiniteError as err:
            raise NonFiniteError(f"step {step}: {err}") from None
        start = time.perf_counter()
        grad_norm = self._grad_norm_before_step()
        self.engine.step()
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        return StepMetrics(
            loss=float(out.loss.loss),
            per_dim_loss=out.loss.per_dim_loss,
            per_dim_accuracy=out.loss.per_dim_accuracy,
            lr=lr,
            grad_norm=float("nan") if grad_norm is None else float(grad_norm),
            num_examples=len(batch),
            num_tokens=out.num_real_tokens,
            seconds={
                "encode": out.encode_seconds,
                "loss": out.loss_seconds,
                "backward": out.backward_seconds,
                "optimizer": time.perf_counter() - start,
            },
        )

    def _encode(self, texts: TextBatch) -> torch.Tensor:
        # Through the engine, not the bare module: DeepSpeed's forward hooks gather ZeRO-3 partitions.
        return self.engine(texts.input_ids.to(self.device), texts.attention_mask.to(self.device))

    def _backward(self, surrogate_loss: torch.Tensor, last: bool) -> None:
        if self.reduction == "chunk":
            # Each chunk is a DeepSpeed micro-step: ZeRO-2/3 reduce-scatter it and add it to the fp32 partition;
            # ZeRO-0/1 accumulate locally and reduce at the boundary, the step's last chunk.
            self.engine.set_gradient_accumulation_boundary(last)
        # gradient_accumulation_steps is 1 and each chunk's surrogate already carries its share of the loss.
        self.engine.backward(surrogate_loss, scale_wrt_gas=False)

    @contextlib.contextmanager
    def _one_reduction(self) -> Iterator[None]:
        """`reduction=step`: wraps every backward of a step so gradients are reduced once, after the last chunk."""
        if self.engine.zero_optimization_stage() == 0:
            # Plain data parallel: no ZeRO reducer to coalesce; skip the per-backward all-reduce, then do one.
            with self.engine.no_sync():
                yield
            self.engine.allreduce_gradients()
        else:
            with self.engine.coalesce_grad_reduction():
                yield

    @contextlib.contextmanager
    def _gather_once(self) -> Iterator[None]:
        """`zero3_pass1=gather_once`: one all-gather of every ZeRO-3 partition for all of pass 1's chunks."""
        import deepspeed

        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            # DeepSpeed's hooks re-partition a layer's parameters after its forward unless some module is still
            # using them; a holder that no module's hook removes keeps them whole until pass 1 ends.
            for p in params:
                p.ds_active_sub_modules.add(_PASS1_HOLDER)
            try:
                yield
            finally:
                for p in params:
                    p.ds_active_sub_modules.discard(_PASS1_HOLDER)

    def _grad_norm_before_step(self) -> float | None:
        """ZeRO optimizers compute the global norm inside `step`; without ZeRO the grads are whole here."""
        if self.engine.zero_optimization_stage() != 0:
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (restored with a checkpoint)."""
        return int(self.engine.global_steps)

    # ---------------------------------------------------------------- state
    def save_checkpoint(self, directory: str | os.PathLike, tag: str, client_state: dict[str, Any]) -> None:
        """All ranks: ZeRO shards (params, optimizer, scheduler) of this rank into `directory/tag`."""
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)

    def load_checkpoint(self, directory: str | os.PathLike, tag: str) -> dict[str, Any]:
        """All ranks: restore what `save_checkpoint` wrote; returns the client state."""
        path, client_state = self.engine.load_checkpoint(
            str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise ValueError(f"{directory}: no DeepSpeed checkpoint with tag {tag!r} to resume from")
        return client_state or {}
