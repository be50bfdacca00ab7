"""CI smoke of `bench/peer.py --quick`: every system trains in its own real processes on the same batches, from the
same weights (the same first-step loss up to dropout). What `peer.py` and `gpu_check.py` cannot run is refused up
front, naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402
import peer  # noqa: E402


@pytest.mark.slow
def test_peer_bench_quick_runs_every_system_on_the_same_batches():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, also on GPU hosts
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "peer.py"), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=840,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    systems = result["systems"]
    assert set(systems) == {"peer", "library", "engine-z0-r1", "engine-z3-r2"}
    assert result["device"] == "cpu" and result["quick"]
    # Same pairs, same tokenizer, same truncation: every system sees exactly the same real tokens.
    assert len({row["real_tokens_per_step"] for row in systems.values()}) == 1
    for name, row in systems.items():
        assert row["examples_per_s"] > 0 and row["peak_rss_mb_per_process"] > 0, name
        assert row["computed_tokens_per_step"] >= row["real_tokens_per_step"], name
    assert systems["peer"]["ratio_examples_per_s"] == 1.0
    # Length-sorted chunks never pad more than arrival-order mini-batches of the same size.
    assert systems["library"]["computed_tokens_per_step"] <= systems["peer"]["computed_tokens_per_step"]
    # The library and the 1-rank ZeRO-0 engine start from the same weights and batches: the same loss.
    assert systems["engine-z0-r1"]["first_loss"] == pytest.approx(systems["library"]["first_loss"], rel=1e-4)
    assert systems["engine-z0-r1"]["step1_loss"] == pytest.approx(systems["library"]["step1_loss"], rel=1e-4)
    assert systems["engine-z3-r2"]["processes"] == 2 and systems["engine-z3-r2"]["zero_stage"] == 3
    # Every system's first step, from the same initial weights on the same 8 texts: the same loss up to dropout masks
    # (4% apart seen at this size; without dropout the two losses are equal, see the next test).
    for name, row in systems.items():
        assert abs(row["step1_loss_vs_peer"]) < 0.1, (name, row["step1_loss"], systems["peer"]["step1_loss"])


def test_peer_and_gemb_dist_compute_the_same_loss_without_dropout():
    """The objective the benchmark compares: sentence-transformers' MatryoshkaLoss(CachedMNRL) with the bench's
    weights and scale equals gemb-dist's cached NCE + MRL loss on the same pairs and weights, in eval mode."""
    from sentence_transformers import SentenceTransformer

    from gemb_dist.gradcache import GradCache
    from gemb_dist.model import EmbeddingModel

    spec = dict(model_path=peer.default_model_path(), global_batch=8, chunk=4, max_length=32, device="cpu",
                precision="fp32", mrl_dims=peer.MRL_DIMS, system="library")  # fmt: skip
    queries, passages = peer.step_texts(peer.load_pairs(), 3, 8, 0, 1)
    st_model = SentenceTransformer(spec["model_path"], device="cpu")
    st_model.max_seq_length = spec["max_length"]
    st_model.eval()
    loss_fn = peer.peer_loss(st_model, spec)
    st_loss = float(loss_fn([st_model.tokenize(queries), st_model.tokenize(passages)], None))
    config = peer.gemb_config(spec)
    model = EmbeddingModel.from_config(config.model).eval()
    batch = peer.gemb_prepare(model, spec)(queries, passages)[0]
    gemb_loss = float(GradCache.from_config(config, model.encode_batch).step(batch).loss.loss)
    assert gemb_loss == pytest.approx(st_loss, rel=1e-5)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (
            ["--precision", "bf16", "--systems", "peer,library,engine-z0-r1,engine-z3-r1"],
            ["engine-z0-r1", "zero_stage=0"],
        ),
        (["--device", "cuda", "--systems", "peer,engine-z3-r1,engine-z3-r2"], ["engine-z3-r2", "one GPU per rank"]),
    ],
)
def test_peer_bench_refuses_what_it_cannot_run_before_starting_anything(argv, words, monkeypatch):
    monkeypatch.setattr(peer.torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as exit_info:
        peer.main(argv)
    for word in words:
        assert word in str(exit_info.value)
    assert "engine-z3-r1" not in str(exit_info.value)


@pytest.mark.parametrize(
    ("version", "ok"), [("5.24.0", True), ("5.2.0.dev0", True), ("5.1.2", False), ("4.57.1", False), ("6.0.0", False)]
)
def test_gpu_check_refuses_a_transformers_it_cannot_run_on(version, ok):
    if ok:
        gpu_check.check_transformers_version(version)
        return
    with pytest.raises(SystemExit, match=rf"transformers {version} is installed; gemb_dist needs >=5.2,<6"):
        gpu_check.check_transformers_version(version)
