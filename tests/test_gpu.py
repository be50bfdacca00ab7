"""GPU path: CUDA RNG replay, bf16, attention kernels, flat memory. Skipped without CUDA (the checks live in
bench/gpu_checks.py so that bench/gpu_check.py can run them where pytest is not installed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_checks  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible to torch)"),
]


@pytest.mark.parametrize("kind", ["bert", "qwen2"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cached_step_equals_plain_step_with_dropout_on_cuda(kind, precision):
    result = gpu_checks.check_cached_equals_plain("cuda", precision, kind)
    assert result["ok"], result


@pytest.mark.parametrize("kind", ["bert", "qwen2"])
def test_pass1_and_pass2_reps_of_each_chunk_are_equal_on_cuda(kind):
    result = gpu_checks.check_pass_reps_equal("cuda", kind)
    assert result["ok"], result


def test_eager_sdpa_and_flash_attention_give_the_same_embeddings_both_padding_sides():
    result = gpu_checks.check_attention_kernels("cuda")
    assert result["ok"], result


def test_peak_gpu_memory_is_flat_in_the_global_batch():
    result = gpu_checks.check_memory_flat("cuda")
    assert result["ok"], result
