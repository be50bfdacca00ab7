"""CI smoke of `bench/peer.py --quick`: every system trains in its own real processes on the same batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    assert systems["engine-z3-r2"]["processes"] == 2 and systems["engine-z3-r2"]["zero_stage"] == 3
