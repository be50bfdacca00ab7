"""The container image, built and run: `make image` with podman (no daemon), then the smoke inside it with no network.

The build needs podman, runc or crun that can start containers, and mmdebstrap for the local Debian base (.ci/run
installs them with apt-get); where any is missing the image tests are skipped with the reason. By hand:

    apt-get install podman mmdebstrap runc && make image-base image image-smoke
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "cluster" / "image"))
sys.path.insert(0, str(REPO / "tests"))
import _kustomize  # noqa: E402
import image  # noqa: E402  (cluster/image/image.py)

TAG = image.default_tag("cpu")
PIP_STEP = REPO / "cluster" / "image" / "pip_step.sh"
BUILD_TIMEOUT_S = 1800


# ------------------------------------------------------------------------------------------------ pip settings
def test_pip_settings_are_mounted_beside_the_image_files(tmp_path):
    wheels = tmp_path / "wheels"
    (wheels).mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    mirror = tmp_path / "mirror"
    (mirror / "simple" / "torch").mkdir(parents=True)
    (mirror / "simple" / "torch" / "index.html").write_text('<a href="../../files/torch-2.14.1%2Bcu128-x.whl">t</a>')
    cert = tmp_path / "ca.crt"
    cert.write_text("")
    listing = "\n".join(
        [
            f"global.cert='{cert}'",
            f":env:.find-links='{wheels}'",
            f"global.extra-index-url='file://{mirror}/simple https://mirror.example/simple'",
            "install.constraint='/does/not/exist.txt'",
        ]
    )
    text, mounts = image.translate_pip_settings(image.parse_pip_config_list(listing))
    prefix = image.HOST_PREFIX
    assert f"cert = {prefix}{cert}" in text
    assert f"find-links = {prefix}{wheels}" in text
    assert f"extra-index-url = file://{prefix}{mirror}/simple https://mirror.example/simple" in text
    assert "constraint = /does/not/exist.txt" in text and "[install]" in text, "paths not on this machine stay"
    # The index is mounted from its parent: its pages link to ../../files beside simple/.
    assert mounts == sorted([(str(cert), prefix + str(cert)), (str(wheels), prefix + str(wheels)),
                             (str(mirror), prefix + str(mirror))])  # fmt: skip
    assert image.torch_in_local_sources(mounts, "2.13.0", "cpu")
    assert image.torch_in_local_sources(mounts, "2.14.1", "cu128"), "found through the index page"
    assert not image.torch_in_local_sources(mounts, "2.13.0", "cu128")


def test_unreadable_pip_settings_name_the_line():
    with pytest.raises(ValueError, match="line 2"):
        image.parse_pip_config_list("global.cert='/x'\nnot a setting")


def test_build_command_keeps_a_local_base_off_registries(tmp_path):
    command = image.build_command("cpu", image.LOCAL_BASE, TAG, tmp_path / "pip.conf", [])
    assert "--pull=never" in command and "--network=host" in command
    assert f"--build-arg=BASE_IMAGE={image.LOCAL_BASE}" in command and "--build-arg=VARIANT=cpu" in command
    assert f"--build-arg=PIP_CONFIG_FILE={image.HOST_PREFIX}/pip.conf" in command
    assert all(flag.endswith(":ro") for flag in command if flag.startswith("--volume="))
    gpu = image.build_command("gpu", None, "gemb-dist:gpu", tmp_path / "pip.conf", [])
    assert not any(flag.startswith("--build-arg=BASE_IMAGE=") for flag in gpu), "the Dockerfile's CUDA default"


# ------------------------------------------------------------------------------------------------ built image
def _skip_reason() -> str | None:
    for tool in ("podman", "make"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install podman mmdebstrap runc; README: Building the image)"
    if not image.image_exists(image.LOCAL_BASE) and shutil.which("mmdebstrap") is None:
        return f"the base {image.LOCAL_BASE} is missing and mmdebstrap, which builds it, is not installed"
    return None


def _make(target: str, log: Path, timeout: float = BUILD_TIMEOUT_S) -> subprocess.CompletedProcess:
    with open(log, "w") as out:
        # --no-print-directory: under `make test` this make is recursive (MAKELEVEL > 0) and would end its output
        # with "make[1]: Leaving directory ...".
        return subprocess.run(
            ["make", "--no-print-directory", target], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
        )


@pytest.fixture(scope="module")
def podman_base(tmp_path_factory) -> str:
    """The local Debian base, built if missing, once podman has shown it can start a container from it."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    logs = tmp_path_factory.mktemp("base")
    if not image.image_exists(image.LOCAL_BASE):
        assert _make("image-base", logs / "base.log").returncode == 0, (logs / "base.log").read_text()[-4000:]
    probe = subprocess.run(
        [*image.podman(), "run", "--rm", "--network=none", *image.ulimit_flags(), image.LOCAL_BASE, "true"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"podman cannot start a container on this machine: {probe.stderr.strip()[-500:]}")
    return image.LOCAL_BASE


@pytest.fixture(scope="module")
def built_image(podman_base, tmp_path_factory) -> str:
    logs = tmp_path_factory.mktemp("image")
    proc = _make("image", logs / "build.log")
    assert proc.returncode == 0, "make image failed:\n" + (logs / "build.log").read_text()[-6000:]
    return TAG


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S + 1500)
def test_smoke_inside_the_image_trains_and_saves_a_model(built_image, tmp_path):
    proc = _make("image-smoke", tmp_path / "smoke.log", timeout=1500)  # 4.5 min idle, 11 min at load 38
    output = (tmp_path / "smoke.log").read_text()
    assert proc.returncode == 0, "make image-smoke failed:\n" + output[-8000:]
    result = json.loads([line for line in output.splitlines() if line.startswith("{")][-1])
    assert result["smoke"] == "ok" and result["mrl_dims"] == [16, 32], result
    for step in ("gemb --help", "gemb config show on every shipped config", "gemb data build", "ray job submit"):
        assert f"smoke: {step}" in output, f"the smoke skipped {step!r}"


# What runs inside the image: every file a RayJob's entrypoint names, relative to the working directory that
# `ray start` (and so the job driver) gets, and the installed versions.
PROBE = """
import importlib.metadata as md, json, os, sys
paths = json.loads(sys.argv[1])
print(json.dumps({
    "cwd": os.getcwd(), "uid": os.getuid(), "missing": [p for p in paths if not os.path.isfile(p)],
    "versions": {name: md.version(name) for name in ("gemb-dist", "torch", "ray", "deepspeed")},
}))
"""


@pytest.mark.slow
def test_rayjob_entrypoints_name_files_that_exist_in_the_image(built_image):
    rendered = _kustomize.render(REPO / "cluster" / "kuberay")
    jobs = [o for o in rendered if o["kind"] == "RayJob"]
    paths = sorted({t for j in jobs for t in shlex.split(j["spec"]["entrypoint"]) if t.endswith((".py", ".yaml"))})
    assert len(paths) == 2 * len(jobs), "every entrypoint names a job script and its config"
    command = [*image.podman(), "run", "--rm", "--network=none", *image.ulimit_flags(), built_image]
    proc = subprocess.run([*command, "python", "-c", PROBE, json.dumps(paths)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["missing"] == [], f"RayJob entrypoints name files the image lacks: {found['missing']}"
    assert found["cwd"] == "/app"
    security = rendered_pod_security(rendered)
    assert found["uid"] == security["runAsUser"], "the image's user is the manifests' runAsUser"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    args = image.dockerfile_args()
    ray_versions = {o["spec"].get("rayVersion") or o["spec"]["rayClusterSpec"]["rayVersion"] for o in rendered
                    if o["kind"] in ("RayCluster", "RayJob")}  # fmt: skip
    versions = found["versions"]
    assert versions["gemb-dist"] == project["version"]
    assert versions["torch"].split("+")[0] == args["TORCH_VERSION"]
    assert versions["deepspeed"] == args["DEEPSPEED_VERSION"]
    assert ray_versions == {versions["ray"]}


def rendered_pod_security(rendered: list[dict]) -> dict:
    cluster = next(o for o in rendered if o["kind"] == "RayCluster")
    return cluster["spec"]["headGroupSpec"]["template"]["spec"]["securityContext"]


# ------------------------------------------------------------------------------------------------ bad input
def test_a_failed_pip_step_names_the_step_and_the_package(tmp_path):
    """cluster/image/pip_step.sh, which every pip step of the Dockerfile runs, on this machine's pip: the last line
    names the step and the requirement pip could not install, and pip's exit status is kept."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    args = ["--dry-run", "--no-index", "--find-links", str(tmp_path), "packaging", "no-such-package==1.0"]
    proc = subprocess.run(["bash", str(PIP_STEP), "dependencies", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert "No matching distribution found for no-such-package==1.0" in proc.stdout, "pip's own error is shown"
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "image build failed at step dependencies: pip install no-such-package==1.0"
    ok = subprocess.run(["bash", str(PIP_STEP), "tools", "--dry-run", "--no-deps", "packaging"], env=env,
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0 and "image build failed" not in ok.stderr


@pytest.mark.slow
def test_missing_base_image_stops_the_build_naming_it(podman_base):
    missing = "localhost/gemb-base:does-not-exist"
    proc = subprocess.run(
        [sys.executable, "cluster/image/image.py", "build", "--base", missing, "--tag", "gemb-dist:never"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"base image {missing} not found" in proc.stderr and "make image-base" in proc.stderr
    # podman itself, without the check: the FROM step fails naming the image, and never reaches a registry.
    direct = subprocess.run(
        [*image.podman(), "build", "--pull=never", "--build-arg", f"BASE_IMAGE={missing}", "-t", "gemb-dist:never",
         str(REPO)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert direct.returncode != 0 and missing.removeprefix("localhost/") in direct.stdout + direct.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_failed_pip_install_stops_the_build_naming_step_and_package(built_image, tmp_path):
    """The layers before DeepSpeed's come from the cache, so this costs one failing pip resolution."""
    tag = "gemb-dist:bad-pin"
    command = [sys.executable, "cluster/image/image.py", "build", "--base", image.LOCAL_BASE, "--tag", tag,
               "--", "--build-arg=DEEPSPEED_VERSION=0.0.999"]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=800)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-4000:]
    assert "image build failed at step deepspeed: pip install deepspeed==0.0.999" in output, output[-4000:]
    pip_errors = [line for line in output.splitlines() if line.startswith("ERROR:") and "deepspeed==0.0.999" in line]
    assert pip_errors, "pip's own error names the package"
    assert not image.image_exists(tag), "a failed build leaves no image behind"


@pytest.mark.slow  # imports every job's schema (evaluation, mining): ~40 s on 2 cores
def test_gemb_config_show_validates_every_shipped_config_but_build_data(capsys):
    """What the smoke runs on each of jobs/configs/*.yaml, here without an image (build_data's schema lives in its
    job script, which the smoke loads directly)."""
    from gemb_dist.cli import main

    configs = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    for path in (p for p in configs if not p.name.startswith("build_data")):
        assert main(["config", "show", "--config", str(path)]) == 0, path.name
        assert yaml.safe_load(capsys.readouterr().out), path.name
