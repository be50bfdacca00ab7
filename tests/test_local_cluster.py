"""cluster/local/start.sh and stop.sh: a real Ray head and MLflow server on 127.0.0.1, stopped by their PIDs."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from _services import BIN_DIR, free_port

REPO = Path(__file__).resolve().parents[1]


def listening_addresses(pids: set[int]) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    addresses = set()
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            address = ipaddress.ip_address(c.laddr.ip)
            addresses.add(getattr(address, "ipv4_mapped", None) or address)  # ::ffff:127.0.0.1 is 127.0.0.1
    return addresses


def tree(pid: int) -> list[psutil.Process]:
    process = psutil.Process(pid)
    return [process, *process.children(recursive=True)]


@pytest.mark.slow
def test_start_submit_stop(tmp_path):
    state = tmp_path / "local"
    env = {
        **os.environ,
        "GEMB_LOCAL_DIR": str(state),
        "RAY_PORT": str(free_port()),
        "RAY_DASHBOARD_PORT": str(free_port()),
        "MLFLOW_PORT": str(free_port()),
        "RAY_NUM_CPUS": "1",
        "VENV": str(BIN_DIR.parent),
    }
    env.pop("RAY_ADDRESS", None)
    subprocess.run(["cluster/local/start.sh"], cwd=REPO, env=env, check=True, timeout=300)
    processes = []
    try:
        processes = [p for name in ("ray", "mlflow") for p in tree(int((state / f"{name}.pid").read_text()))]
        listening = listening_addresses({p.pid for p in processes})
        assert len(listening) > 0 and all(address.is_loopback for address in listening), listening
        job_api = f"http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}"
        with pytest.raises(urllib.error.HTTPError, match="401"):  # the job API runs code: no token, no entry
            urllib.request.urlopen(f"{job_api}/api/jobs/", timeout=10)
        with urllib.request.urlopen(f"http://127.0.0.1:{env['MLFLOW_PORT']}/health", timeout=10) as response:
            assert response.read() == b"OK"

        # A job submitted the documented way runs this environment's Python, with this project importable.
        script = "import sys, gemb_dist, ray; ray.init(); print('JOB', sys.prefix, ray.cluster_resources()['CPU'])"
        submit = f'source {state}/env.sh && {BIN_DIR}/ray job submit --working-dir . -- python -c "{script}"'
        out = subprocess.run(["bash", "-c", submit], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert f"JOB {BIN_DIR.parent} 1.0" in out.stdout

        again = subprocess.run(
            ["cluster/local/start.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
        assert again.returncode == 0 and again.stdout.count("already running") == 2, again.stdout + again.stderr
    finally:
        subprocess.run(["cluster/local/stop.sh"], cwd=REPO, env=env, check=True, timeout=120)
    assert not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not (state / "ray.pid").exists() and not (state / "mlflow.pid").exists()
    assert (state / "ray_logs").is_dir()
