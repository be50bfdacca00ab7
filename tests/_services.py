"""Real servers for integration tests: an MLflow tracking server and a Ray head, on 127.0.0.1 and free ports.

Each is a context manager that starts the server under a directory of the test's own and stops exactly the
processes it started (by PID, never `ray stop`, which would end every Ray on the machine). Wrap them in
fixtures of whatever scope a test module needs:

    @pytest.fixture(scope="module")
    def mlflow(tmp_path_factory):
        with mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
            yield server            # server.uri == "http://127.0.0.1:<port>"

    @pytest.fixture(scope="module")
    def ray_cluster(tmp_path_factory):
        with ray_head(tmp_path_factory.mktemp("ray"), num_cpus=2) as head:
            yield head              # head.address (for ray.init), head.dashboard_url (for ray job submit)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from gemb_dist.ray_ready import wait_for_job_api

BIN_DIR = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(
    url: str, process: subprocess.Popen, log_path: Path, timeout_s: float, headers: dict[str, str] | None = None
) -> None:
    """Poll `url` until it answers 200; fail with the server's log tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:2]} exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s:\n{_tail(log_path)}")


def stop_process_tree(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM the process we started, let it stop its own children, then SIGKILL any of them left."""
    if process.poll() is not None:
        return
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


@contextmanager
def moto_server(root: Path) -> Iterator[str]:
    """A real moto S3 server on a free port; yields its endpoint URL (credentials: any, region us-east-1)."""
    log_path = root / "moto.log"
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(BIN_DIR / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for_http(f"{endpoint}/moto-api/", process, log_path, timeout_s=60)
        yield endpoint
    finally:
        stop_process_tree(process)


def _tail(path: Path, num_chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-num_chars:] if path.exists() else "(no log)"


class MlflowServer:
    """`mlflow server` with a sqlite backend and proxied artifacts under `root`; restartable on the same port."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend_uri(self) -> str:
        return f"sqlite:///{self.root.resolve()}/mlflow.db"

    def start(self, timeout_s: float = 90.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log_path = self.root / "server.log"
        cmd = [
            str(BIN_DIR / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", self.backend_uri, "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with log_path.open("a") as log:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_http(f"{self.uri}/health", self.process, log_path, timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            stop_process_tree(self.process)
            self.process = None


@contextmanager
def mlflow_server(root: Path, port: int | None = None) -> Iterator[MlflowServer]:
    server = MlflowServer(root, port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class RayHead:
    """A Ray head started with `ray start --head --block`, every port chosen free, its own temp dir."""

    def __init__(self, root: Path, num_cpus: int = 2, object_store_mb: int = 512) -> None:
        self.root = Path(root)
        self.num_cpus = num_cpus
        self.object_store_mb = object_store_mb
        self.port = free_port()
        self.dashboard_port = free_port()
        # Ray's unix sockets live under the temp dir and must stay under 108 characters: keep it short.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """GCS address for `ray.init(address=...)`."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """Address for `ray job submit --address ...`."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 120.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log_path = self.root / "ray_head.log"
        ports = ["node-manager-port", "object-manager-port", "ray-client-server-port", "dashboard-agent-grpc-port",
                 "dashboard-agent-listen-port", "runtime-env-agent-port", "metrics-export-port"]  # fmt: skip
        cmd = [
            str(BIN_DIR / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
            f"--port={self.port}", f"--dashboard-port={self.dashboard_port}", f"--num-cpus={self.num_cpus}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}", f"--temp-dir={self.temp_dir}",
            *[f"--{name}={free_port()}" for name in ports],
        ]  # fmt: skip
        # Job entrypoints run `python ...` from the head's PATH: put this interpreter's environment first.
        # Token auth stays off unless the test asks for it: otherwise a token that any local ray.init() left in
        # ~/.ray would switch this head to token auth while the test's clients send none.
        env = {
            **os.environ,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
            # Every Ray process inherits it: Ray's own helpers that look the cluster up would otherwise fail
            # whenever another test's Ray runs on the machine ("Found multiple active Ray instances").
            "RAY_ADDRESS": self.address,
            "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        with log_path.open("a") as log:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"{self.dashboard_url}/api/version"
            wait_for_http(url, self.process, log_path, timeout_s, headers=_ray_auth_headers(env))
            wait_for_job_api(self.dashboard_url, headers=_ray_auth_headers(env), timeout_s=timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            stop_process_tree(self.process, timeout_s=40.0)
            self.process = None
        logs = self.temp_dir / "session_latest" / "logs"
        if logs.is_dir():  # keep the logs for a failed test's post-mortem, drop the sockets and object files
            shutil.move(str(logs.resolve()), self.root / f"ray_logs_{int(time.time())}")
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _ray_auth_headers(env: dict[str, str]) -> dict[str, str]:
    """The bearer header Ray's dashboard wants when the head runs with RAY_AUTH_MODE=token."""
    if env.get("RAY_AUTH_MODE") != "token":
        return {}
    token = env.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextmanager
def ray_head(root: Path, num_cpus: int = 2, object_store_mb: int = 512) -> Iterator[RayHead]:
    head = RayHead(root, num_cpus=num_cpus, object_store_mb=object_store_mb)
    head.start()
    try:
        yield head
    finally:
        head.stop()
