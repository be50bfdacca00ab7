"""The README's "Training on your own data" commands, literally: `gemb data build`, `cluster/local/start.sh && source
<state>/env.sh`, `ray job submit ... jobs/prefinetune.py ...` with no MLflow flag; the run must be on the MLflow
server start.sh started, and the head must count every core even with OMP_NUM_THREADS=1 in the shell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _services import BIN_DIR, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_readme_own_data_commands_log_to_the_local_mlflow_server(tmp_path):
    from mlflow import MlflowClient

    pairs = tmp_path / "pairs.jsonl"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron".split()
    with pairs.open("w") as f:
        for i in range(256):  # two global batches of prefinetune_minilm_cpu.yaml (128)
            a, b = words[i % len(words)], words[(i * 7 + 3) % len(words)]
            f.write(json.dumps({"task": "pairs", "query": f"{a} {b} {i}", "positive": f"about {a} and {b} {i}"}) + "\n")
    state = tmp_path / "local"
    env = {
        **os.environ,
        "PATH": f"{BIN_DIR}{os.pathsep}{os.environ['PATH']}",
        "GEMB_LOCAL_DIR": str(state),
        "GEMB_RUNS_ROOT": str(tmp_path / "home"),  # where the job's relative ray.storage_path (runs) lands
        "RAY_PORT": str(free_port()),
        "RAY_DASHBOARD_PORT": str(free_port()),
        "MLFLOW_PORT": str(free_port()),
        "VENV": str(BIN_DIR.parent),
        "OMP_NUM_THREADS": "1",  # a shared machine's shell: `nproc` would say 1 and the 2-worker job would starve
    }
    for name in ("RAY_ADDRESS", "RAY_NUM_CPUS", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE"):
        env.pop(name, None)
    shards = tmp_path / "data" / "shards"
    readme = f"""set -e
gemb data build --input {pairs} --output {shards}
cluster/local/start.sh && source {state}/env.sh
ray job submit --working-dir . -- \\
    python jobs/prefinetune.py --config jobs/configs/prefinetune_minilm_cpu.yaml --set data.shards={shards} \\
    --set train.max_steps=2
"""
    try:
        proc = subprocess.run(["bash", "-c", readme], cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-6000:]
        assert "WARNING: no MLflow tracking server" not in log
        assert f"MLflow at http://127.0.0.1:{env['MLFLOW_PORT']}" in log
        assert f"{os.cpu_count()} CPUs" in log, "start.sh counted fewer cores than the machine has"

        client = MlflowClient(f"http://127.0.0.1:{env['MLFLOW_PORT']}")
        experiment = client.get_experiment_by_name("gemb-minilm")
        assert experiment is not None, "the job's experiment is not on the local server"
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2]
        assert (tmp_path / "home" / "runs" / run.info.run_name / "model").is_dir()
    finally:
        subprocess.run(["cluster/local/stop.sh"], cwd=REPO, env=env, timeout=180)
