"""Build and smoke-test the gemb-dist image with podman, no daemon: `make image-base`, `make image`, `make image-smoke`.

    python3 cluster/image/image.py base  [--tag localhost/gemb-base:bookworm]
    python3 cluster/image/image.py build [--variant cpu|gpu] [--base IMAGE] [--tag TAG]
    python3 cluster/image/image.py smoke [--tag TAG]

Standard library only: it runs on the host, before any project environment exists.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCAL_BASE = "localhost/gemb-base:bookworm"
# The one command that makes the local base from Debian's packages (README, `make image-base`).
BASE_COMMAND = "mmdebstrap --variant=minbase --include=python3,ca-certificates bookworm"
# Where the machine's pip files appear inside build steps: beside, not over, the image's own files (the pip CA
# bundle is often /etc/ssl/certs/ca-certificates.crt, which apt inside the build must still be able to rewrite).
HOST_PREFIX = "/run/host-pip"
SMOKE_SCRIPT = Path(__file__).with_name("smoke.sh")


class ImageError(RuntimeError):
    """A build or smoke step that cannot go on; the message names the step and what to do."""


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def dockerfile_args() -> dict[str, str]:
    """Default values of the Dockerfile's ARGs (the build's single source of versions)."""
    args = {}
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("ARG ") and "=" in line:
            name, _, value = line[4:].partition("=")
            args[name.strip()] = value.strip().strip('"')
    return args


def default_tag(variant: str) -> str:
    flavour = "cpu" if variant == "cpu" else dockerfile_args()["TORCH_CUDA"]
    return f"gemb-dist:{project_version()}-{flavour}"


# ------------------------------------------------------------------------------------------------ podman
def podman() -> list[str]:
    """podman, with runc where it is installed: crun (podman's default) refuses hosts whose cgroups mix v1 and v2
    ("cgroups in hybrid mode not supported"); runc runs there and everywhere else. IMAGE_RUNTIME overrides."""
    runtime = os.environ.get("IMAGE_RUNTIME", "runc" if shutil.which("runc") else "")
    return ["podman", *(["--runtime", runtime] if runtime else [])]


def ulimit_flags() -> list[str]:
    """Container limits within this shell's hard limits: podman's default nofile (1048576) exceeds them where the host
    caps them, and the runtime's setrlimit is then refused. nproc is capped lower still: a sandboxed host refused
    40000 with a hard limit of 96363 and took 32768. IMAGE_ULIMITS="nofile=N:N nproc=M:M" overrides."""
    if "IMAGE_ULIMITS" in os.environ:
        return [flag for value in os.environ["IMAGE_ULIMITS"].split() for flag in ("--ulimit", value)]
    flags = []
    for name, limit, cap in (("nofile", resource.RLIMIT_NOFILE, 65536), ("nproc", resource.RLIMIT_NPROC, 32768)):
        hard = resource.getrlimit(limit)[1]
        value = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
        flags += ["--ulimit", f"{name}={value}:{value}"]
    return flags


def image_exists(name: str) -> bool:
    return subprocess.run([*podman(), "image", "exists", name], capture_output=True).returncode == 0


def run(command: list[str], step: str, **kwargs) -> subprocess.CompletedProcess:
    print("+ " + shlex.join(command), flush=True)
    proc = subprocess.run(command, **kwargs)
    if proc.returncode != 0:
        raise ImageError(f"{step} failed (exit status {proc.returncode}); its output is above")
    return proc


# ------------------------------------------------------------------------------------------------ pip settings
def parse_pip_config_list(text: str) -> dict[str, dict[str, str]]:
    """`pip config list` lines (`global.cert='/x'`, `:env:.find-links='/y'`) -> {section: {key: value}}."""
    sections: dict[str, dict[str, str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, sep, value = line.partition("=")
        section, dot, key = name.rpartition(".")
        if not sep or not dot:
            raise ValueError(f"pip config list, line {number}: expected section.key='value', got {line!r}")
        section = "global" if section == ":env:" else section  # PIP_* variables act as [global] settings
        sections.setdefault(section, {})[key] = ast.literal_eval(value)
    return sections


def _local_path(token: str) -> str | None:
    if token.startswith("file://"):
        return token.removeprefix("file://")
    return token if token.startswith("/") else None


def translate_pip_settings(sections: dict[str, dict[str, str]]) -> tuple[str, list[tuple[str, str]]]:
    """The settings as one pip.conf whose local paths point under HOST_PREFIX, and the (host, build) mounts.

    A file:// index is mounted from its parent folder: a PEP 503 mirror keeps its files beside `simple/`, and its
    pages link to them relatively (`../../files/...`)."""
    mounts: dict[str, str] = {}
    config = configparser.ConfigParser(interpolation=None)
    for section, values in sections.items():
        config[section] = {}
        for key, value in values.items():
            tokens = []
            for token in value.split():
                path = _local_path(token)
                if path is None or not os.path.exists(path):
                    tokens.append(token)
                    continue
                is_index = token.startswith("file://") and key.endswith("index-url")
                root = os.path.dirname(path.rstrip("/")) if is_index else path
                mounts[root] = HOST_PREFIX + root
                tokens.append(token.replace(path, HOST_PREFIX + path, 1))
            config[section][key] = " ".join(tokens)
    lines = []
    for section in config.sections():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value}" for key, value in config[section].items()]
    return "\n".join(lines) + "\n", sorted(mounts.items())


def host_pip_settings() -> dict[str, dict[str, str]]:
    """The effective pip settings of this machine (files and PIP_* variables), as its own pip reports them."""
    pip = shlex.split(os.environ.get("IMAGE_HOST_PIP", "python3 -m pip"))
    try:
        proc = subprocess.run([*pip, "config", "list"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return {}
    return parse_pip_config_list(proc.stdout) if proc.returncode == 0 else {}


def torch_in_local_sources(mounts: list[tuple[str, str]], version: str, flavour: str) -> bool:
    """Whether the machine's local wheel folders or file:// indexes hold this exact torch build."""
    names = (f"torch-{version}+{flavour}-", f"torch-{version}%2B{flavour}-")
    for host, _ in mounts:
        folder = Path(host)
        if not folder.is_dir():
            continue
        if any(folder.glob(f"torch-{version}+{flavour}-*.whl")):
            return True
        for page in folder.glob("simple/torch/index.html"):
            if any(name in page.read_text(errors="replace") for name in names):
                return True
    return False


# ------------------------------------------------------------------------------------------------ commands
def build_base(tag: str) -> None:
    if shutil.which("mmdebstrap") is None:
        raise ImageError("image-base: mmdebstrap is not installed (apt-get install mmdebstrap podman)")
    with tempfile.TemporaryDirectory(prefix="gemb-base-") as tmp:
        # A tar file, not a pipe: a failed debootstrap must not leave a half-imported base behind.
        rootfs = Path(tmp) / "rootfs.tar"
        run([*shlex.split(BASE_COMMAND), str(rootfs)], "image-base: mmdebstrap")
        run([*podman(), "import", str(rootfs), tag], "image-base: podman import")


def build_command(variant: str, base: str | None, tag: str, pip_conf: Path, extra: list[str]) -> list[str]:
    text, mounts = translate_pip_settings(host_pip_settings())
    pip_conf.write_text(text)
    mounts = [*mounts, (str(pip_conf), f"{HOST_PREFIX}/pip.conf")]
    args = {"VARIANT": variant, "PIP_CONFIG_FILE": f"{HOST_PREFIX}/pip.conf"}
    if base:
        args["BASE_IMAGE"] = base
    defaults = dockerfile_args()
    flavour = "cpu" if variant == "cpu" else defaults["TORCH_CUDA"]
    torch_index = os.environ.get("IMAGE_TORCH_INDEX_URL", "auto")
    if torch_index == "auto":
        # torch from the machine's own sources when they hold the exact build; else from PyTorch's index.
        local = torch_in_local_sources(mounts, defaults["TORCH_VERSION"], flavour)
        torch_index = "" if local else defaults["TORCH_INDEX_URL"]
    args["TORCH_INDEX_URL"] = torch_index
    command = [*podman(), "build", "--layers", "--network=host", *ulimit_flags(), "-f", str(ROOT / "Dockerfile")]
    # A base named localhost/... exists only here: never try a registry for it.
    command += ["--pull=never"] if (base or "").startswith("localhost/") else []
    command += [f"--volume={host}:{inside}:ro" for host, inside in mounts]
    command += [f"--build-arg={name}={value}" for name, value in args.items()]
    return [*command, "-t", tag, *extra, str(ROOT)]


def build_image(variant: str, base: str | None, tag: str, extra: list[str]) -> None:
    if base and base.startswith("localhost/") and not image_exists(base):
        raise ImageError(f"image: base image {base} not found; `make image-base` builds it ({BASE_COMMAND})")
    with tempfile.TemporaryDirectory(prefix="gemb-image-") as tmp:
        run(build_command(variant, base, tag, Path(tmp) / "pip.conf", extra), f"image: podman build of {tag}")


def smoke_command(tag: str) -> list[str]:
    """The container of the smoke: no network, the script on stdin, Ray's object store in a big enough /dev/shm."""
    return [*podman(), "run", "--rm", "-i", "--network=none", "--shm-size=1g", *ulimit_flags(), tag, "bash", "-s"]


def smoke(tag: str) -> None:
    if not image_exists(tag):
        raise ImageError(f"image-smoke: image {tag} not found; `make image` builds it")
    with open(SMOKE_SCRIPT) as script:
        run(smoke_command(tag), f"image-smoke of {tag}", stdin=script)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("base", help="Build the local Debian base from Debian packages.")
    base.add_argument("--tag", default=LOCAL_BASE)
    build = sub.add_parser("build", help="podman build of the Dockerfile.")
    build.add_argument("--variant", choices=["cpu", "gpu"], default="cpu")
    build.add_argument("--base", default=None, help="base image (default: the Dockerfile's, a CUDA image)")
    build.add_argument("--tag", default=None)
    build.add_argument("extra", nargs="*", help="more podman build flags, after --")
    smoke_parser = sub.add_parser("smoke", help="Run cluster/image/smoke.sh inside the image, with no network.")
    smoke_parser.add_argument("--tag", default=default_tag("cpu"))
    args = parser.parse_args(argv)
    try:
        if args.command == "base":
            build_base(args.tag)
        elif args.command == "build":
            build_image(args.variant, args.base, args.tag or default_tag(args.variant), args.extra)
        else:
            smoke(args.tag)
    except ImageError as err:
        print(f"image.py: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
