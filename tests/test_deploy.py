"""Deployment artefacts without a cluster: KubeRay manifests, the Ray cluster launcher config and the Dockerfile.

Ray objects are validated against KubeRay's own CRD schemas (../shared/kuberay-crds), strictly: a field the
schema does not define is an error, as with `kubectl apply --validate=strict`.
"""

from __future__ import annotations

import base64
import configparser
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

sys.path.insert(0, str(Path(__file__).parent))
import _kustomize  # noqa: E402
from _services import BIN_DIR, free_port, stop_process_tree, wait_for_http  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
LAUNCHER = ROOT / "cluster" / "ray-cluster.yaml"
CRDS = ROOT.parent / "shared" / "kuberay-crds"
SHARED_MOUNT = "/mnt/gemb"
JOBS = {"build-data", "prefinetune", "finetune", "soup", "evaluate"}
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL|PRIVATE)", re.IGNORECASE)
SECRET_VALUE = re.compile(
    r"(AKIA[0-9A-Z]{16}"  # AWS access key id
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|[a-z][a-z0-9+.-]*://[^/\s:@$]+:[^/\s@$]+@"  # user:password@ inside a URI
    r"|\b(ghp|hf|sk)[-_][A-Za-z0-9]{20,})"  # GitHub, Hugging Face, OpenAI style tokens
)


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return _kustomize.render(KUBERAY)


def _of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _cluster_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    """(owner name, RayClusterSpec) of the RayCluster and of every RayJob."""
    specs = [(o["metadata"]["name"], o["spec"]) for o in _of_kind(objects, "RayCluster")]
    return specs + [(o["metadata"]["name"], o["spec"]["rayClusterSpec"]) for o in _of_kind(objects, "RayJob")]


def _pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template in the rendered objects."""
    pods = []
    for name, spec in _cluster_specs(objects):
        pods.append((f"{name}/head", spec["headGroupSpec"]["template"]["spec"]))
        pods += [(f"{name}/{g['groupName']}", g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    pods += [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in _of_kind(objects, "Deployment")]
    return pods


def _pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    requirements = {}
    for line in lines:
        requirement = Requirement(line)
        requirements[requirement.name.lower()] = requirement
    return requirements


def _strict(schema):
    """OpenAPI schemas allow unknown fields (the API server prunes them); reject them instead, like kubectl."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: _strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    return schema


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.Validator]:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (copied from ray-project/kuberay; see its README)")
    validators = {}
    for kind, file in (("RayCluster", "ray.io_rayclusters.yaml"), ("RayJob", "ray.io_rayjobs.yaml")):
        crd = yaml.load((CRDS / file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        validators[kind] = jsonschema.Draft202012Validator(_strict(version["schema"]["openAPIV3Schema"]))
    return validators


def _schema_errors(validator: jsonschema.Validator, obj: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(obj)]


# ------------------------------------------------------------------------------------------------ manifests
def test_every_manifest_parses_and_is_listed_in_the_kustomization():
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    files = sorted(p.name for p in KUBERAY.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    for name in files:
        for doc in _kustomize.load_documents(KUBERAY / name):
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), name
    assert yaml.safe_load(LAUNCHER.read_text())["cluster_name"]


def test_python_rendering_matches_kustomize(rendered):
    if shutil.which("kustomize"):
        command = ["kustomize", "build", str(KUBERAY)]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(KUBERAY)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed; the other tests use the Python rendering")
    output = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    reference = [doc for doc in yaml.safe_load_all(output) if doc]

    def key(obj: dict) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    assert sorted(rendered, key=key) == sorted(reference, key=key)


def test_python_rendering_refuses_kustomize_features_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamespace: gemb\n")
    with pytest.raises(ValueError, match="namespace"):
        _kustomize.render(tmp_path)


def test_ray_objects_validate_against_the_kuberay_crds(rendered, crd_validators):
    ray_objects = _of_kind(rendered, "RayCluster") + _of_kind(rendered, "RayJob")
    assert len(ray_objects) == 1 + len(JOBS)
    for obj in ray_objects:
        errors = _schema_errors(crd_validators[obj["kind"]], obj)
        assert not errors, f"{obj['kind']}/{obj['metadata']['name']}: {errors}"


def test_schema_check_rejects_misspelt_and_mistyped_fields(rendered, crd_validators):
    job = next(o for o in rendered if o["kind"] == "RayJob")
    misspelt = {**job, "spec": {**job["spec"], "shutdownAfterJobFinish": True}}
    mistyped = {**job, "spec": {**job["spec"], "activeDeadlineSeconds": "one day"}}
    assert any("shutdownAfterJobFinish" in e for e in _schema_errors(crd_validators["RayJob"], misspelt))
    assert _schema_errors(crd_validators["RayJob"], mistyped)


def test_one_rayjob_per_job_with_lifecycle_limits(rendered):
    jobs = _of_kind(rendered, "RayJob")
    assert {j["metadata"]["labels"]["app.kubernetes.io/component"] for j in jobs} == JOBS
    for job in jobs:
        spec, name = job["spec"], job["metadata"]["name"]
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert spec["ttlSecondsAfterFinished"] > 0, name
        assert spec["activeDeadlineSeconds"] > 0, name
        assert "$" not in spec["entrypoint"], f"{name}: the submitter pod would expand it, not the head"
        # KubeRay's own limits on names (a RayJob name becomes part of pod and service names).
        assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name


def test_each_apply_selector_picks_one_part(rendered):
    """`kubectl apply -k cluster/kuberay -l app.kubernetes.io/component=<part>` (README) applies one part only."""
    parts: dict[str, list[str]] = {}
    for obj in rendered:
        component = obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        assert component, f"{obj['kind']}/{obj['metadata']['name']} has no app.kubernetes.io/component label"
        parts.setdefault(component, []).append(obj["kind"])
    assert set(parts) == JOBS | {"platform", "interactive-cluster"}
    assert all(parts[job] == ["RayJob"] for job in JOBS) and parts["interactive-cluster"] == ["RayCluster"]
    assert not {"RayJob", "RayCluster"} & set(parts["platform"])


def test_ray_clusters_autoscale_gpu_workers_with_token_auth(rendered):
    ray_pin = _pyproject_requirements()["ray"]
    for name, spec in _cluster_specs(rendered):
        assert spec["rayVersion"] in ray_pin.specifier and str(ray_pin.specifier).startswith("=="), name
        assert spec["authOptions"] == {"mode": "token", "secretName": "gemb-ray-token"}, name
        assert spec["enableInTreeAutoscaling"] is True, name
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP", name
        head_resources = head["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in head_resources["limits"], f"{name}: the head runs drivers, not GPU work"
        gpu_groups = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in _container(g)["resources"]["limits"]]
        assert gpu_groups, f"{name}: no GPU worker group"
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["maxReplicas"] and group["maxReplicas"] > 0, name
            resources = _container(group)["resources"]
            assert resources["requests"] == resources["limits"], f"{name}/{group['groupName']}"
            # KubeRay rejects resources given both in rayStartParams and in the group's `resources`.
            assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(group["rayStartParams"])
        for group in gpu_groups:
            tolerations = group["template"]["spec"]["tolerations"]
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), f"{name}/{group['groupName']}"


def _container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def test_every_ray_pod_sees_the_same_storage_settings_and_credentials(rendered):
    ray_pods = [(where, pod) for where, pod in _pod_specs(rendered) if "/" in where]
    assert len(ray_pods) == 3 * (1 + len(JOBS))
    first_pod = ray_pods[0][1]
    for where, pod in ray_pods:
        container = pod["containers"][0]
        assert pod["volumes"] == first_pod["volumes"], where
        assert container["volumeMounts"] == first_pod["containers"][0]["volumeMounts"], where
        assert container["env"] == first_pod["containers"][0]["env"], where
        assert container["envFrom"] == [{"configMapRef": {"name": "gemb-settings"}}], where
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        assert claims.get(next(n for n, p in mounts.items() if p == SHARED_MOUNT)) == "gemb-storage", where
    storage = next(
        o for o in rendered if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "gemb-storage"
    )
    assert storage["spec"]["accessModes"] == ["ReadWriteMany"], "every node mounts it at once"
    assert storage["spec"]["resources"]["requests"]["storage"] and storage["spec"]["storageClassName"]


def test_pods_run_as_non_root_without_host_access(rendered):
    for where, pod in _pod_specs(rendered):
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
        assert not any("hostPath" in v for v in pod.get("volumes", [])), where
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert not any("hostPort" in p for p in container.get("ports", [])), where


def test_nothing_is_exposed_beyond_cluster_ip(rendered):
    assert not {o["kind"] for o in rendered} & {"Ingress", "Route", "Gateway", "HTTPRoute", "IngressRoute"}
    services = _of_kind(rendered, "Service")
    assert services, "the MLflow service is missing"
    for service in services:
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
        assert "externalIPs" not in service["spec"], service["metadata"]["name"]
    for _, spec in _cluster_specs(rendered):
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    policies = {p["metadata"]["name"]: p["spec"] for p in _of_kind(rendered, "NetworkPolicy")}
    assert policies["gemb-ray"]["podSelector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    assert policies["gemb-mlflow"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "gemb-mlflow"}


def _literal_secrets(objects) -> list[str]:
    """Env entries that carry a secret-looking name or value literally, and secret-looking strings anywhere."""
    found = []

    def visit(node, where: str) -> None:
        if isinstance(node, dict):
            if (
                "name" in node
                and "value" in node
                and isinstance(node["name"], str)
                and SECRET_NAME.search(node["name"])
            ):
                found.append(f"{where}: env {node['name']} has a literal value (use valueFrom.secretKeyRef)")
            for key, value in node.items():
                if (
                    isinstance(key, str)
                    and SECRET_NAME.search(key)
                    and isinstance(value, str)
                    and where.endswith("data")
                ):
                    found.append(f"{where}: key {key} holds a literal value")
                visit(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                visit(item, f"{where}[{i}]")
        elif isinstance(node, str) and SECRET_VALUE.search(node):
            found.append(f"{where}: looks like a credential: {node[:40]!r}")

    visit(objects, "")
    return found


def test_no_literal_secrets_anywhere(rendered):
    assert not _of_kind(rendered, "Secret"), "Secrets are created out of band (cluster/README.md), never committed"
    assert _literal_secrets(rendered) == []
    assert _literal_secrets(yaml.safe_load(LAUNCHER.read_text())) == []
    assert _literal_secrets([line for line in (ROOT / "Dockerfile").read_text().splitlines()]) == []
    for _, pod in _pod_specs(rendered):
        for entry in pod["containers"][0]["env"]:
            if SECRET_NAME.search(entry["name"]):
                assert "secretKeyRef" in entry["valueFrom"], entry["name"]


def test_secret_scan_flags_planted_credentials():
    planted = [
        {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]},
        {"args": ["--backend-store-uri=postgresql://mlflow:hunter2@db:5432/mlflow"]},
        {"data": {"MLFLOW_TRACKING_PASSWORD": "abc"}},
        "AKIAABCDEFGHIJKLMNOP",
    ]
    assert len(_literal_secrets(planted)) == len(planted)
    assert _literal_secrets([{"env": [{"name": "AWS_DEFAULT_REGION", "value": "us-east-1"}]}]) == []


def test_image_and_settings_are_set_in_one_place(rendered):
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    expected = f"{image['newName']}:{image['newTag']}"
    images = {c["image"] for _, pod in _pod_specs(rendered) for c in pod["containers"]}
    assert images == {expected}
    settings = dict(entry.split("=", 1) for entry in kustomization["configMapGenerator"][0]["literals"])
    for path in KUBERAY.glob("*.yaml"):
        if path.name == "kustomization.yaml":
            continue
        text = path.read_text()
        assert set(re.findall(r"\bimage:\s*(\S+)", text)) <= {"gemb-dist"}, f"{path.name}: name the image `gemb-dist`"
        for value in (image["newName"], settings["MLFLOW_TRACKING_URI"], settings["MLFLOW_ARTIFACTS_DESTINATION"]):
            assert value not in text, f"{path.name} repeats {value!r}; set it in kustomization.yaml only"
    # The tracking URI names the MLflow Service and its port.
    uri = urlparse(settings["MLFLOW_TRACKING_URI"])
    service = next(s for s in _of_kind(rendered, "Service") if s["metadata"]["name"] == uri.hostname)
    assert uri.port in [p["port"] for p in service["spec"]["ports"]]


def _mlflow_container(rendered: list[dict]) -> dict:
    (deployment,) = _of_kind(rendered, "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _config_map(rendered: list[dict], name: str) -> dict:
    return next(c for c in rendered if c["kind"] == "ConfigMap" and c["metadata"]["name"] == name)


def test_mlflow_server_security_options_are_set(rendered):
    container = _mlflow_container(rendered)
    args = dict(arg.removeprefix("--").partition("=")[::2] for arg in container["args"])
    assert args["app-name"] == "basic-auth"
    assert "*" not in args["allowed-hosts"].split(",")
    assert args["backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert args["artifacts-destination"] == "$(MLFLOW_ARTIFACTS_DESTINATION)"
    env = {e["name"]: e for e in container["env"]}
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"], name
    assert urlparse(_config_map(rendered, "gemb-settings")["data"]["MLFLOW_ARTIFACTS_DESTINATION"]).scheme == "s3"
    # The auth config is mounted where MLFLOW_AUTH_CONFIG_PATH points, its user database on a volume.
    auth = configparser.ConfigParser()
    auth.read_string(_config_map(rendered, "gemb-mlflow-auth")["data"]["basic_auth.ini"])
    assert "admin_password" not in auth["mlflow"], "the admin password comes from a Secret"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"]).parent.as_posix() in mounts
    database = Path(auth["mlflow"]["database_uri"].removeprefix("sqlite:///"))
    volumes = {v["name"]: v for v in _of_kind(rendered, "Deployment")[0]["spec"]["template"]["spec"]["volumes"]}
    assert "persistentVolumeClaim" in volumes[mounts[database.parent.as_posix()]]


def _get(url: str, host: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Host": host})
    if user:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
def test_mlflow_server_starts_with_the_manifest_flags_and_refuses_anonymous_and_foreign_hosts(rendered, tmp_path):
    """The Deployment's own command line, with only addresses and stores made local, run by this mlflow."""
    container = _mlflow_container(rendered)
    port = free_port()
    local = {
        "--host": "127.0.0.1",
        "--port": str(port),
        "--workers": "1",
        "--backend-store-uri": f"sqlite:///{tmp_path}/mlflow.db",
        "--artifacts-destination": str(tmp_path / "artifacts"),
    }
    args = [f"{k}={local[k]}" if k in local else arg for arg in container["args"] for k in [arg.partition("=")[0]]]
    auth = configparser.ConfigParser()
    auth.read_string(_config_map(rendered, "gemb-mlflow-auth")["data"]["basic_auth.ini"])
    auth["mlflow"]["database_uri"] = f"sqlite:///{tmp_path}/auth.db"
    with open(tmp_path / "basic_auth.ini", "w") as handle:
        auth.write(handle)
    password = os.urandom(12).hex()
    environment = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(12).hex(),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    command = [str(BIN_DIR / container["command"][0]), *container["command"][1:], *args]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env=environment, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        wait_for_http(f"{base}/health", server, log_path, timeout_s=90)
        assert _get(search, f"localhost:{port}") == 401, "anonymous requests must be refused"
        assert _get(search, f"localhost:{port}", "admin", "wrong") == 401
        assert _get(search, f"localhost:{port}", "admin", password) == 200
        assert _get(search, "gemb-mlflow:5000", "admin", password) == 200, "the in-cluster service name is allowed"
        assert _get(search, "attacker.example:5000", "admin", password) == 403, "DNS rebinding guard"
    finally:
        stop_process_tree(server)


# ------------------------------------------------------------------------------------------------ VM cluster
def test_ray_cluster_launcher_config_is_valid_and_private():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(config))  # what `ray up` does first: provider defaults, then Ray's schema
    assert config["provider"]["type"] == "aws"
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) > 0 for t in workers)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the job API must not listen on the network"
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(commands)
    assert "~/.ray/auth_token" in config["file_mounts"]
    setup = " ".join(config["setup_commands"])
    for name, version in _pinned(setup).items():
        assert version in _pyproject_requirements()[name].specifier, f"ray-cluster.yaml pins {name}=={version}"
    assert {"torch", "deepspeed"} <= set(_pinned(setup))
    assert "job submit" in LAUNCHER.read_text() and "jobs/configs/prefinetune_qwen_gpu.yaml" in LAUNCHER.read_text()


def _pinned(text: str) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"\b([A-Za-z][\w.-]*)==([\w.+]+)", text)}


# ------------------------------------------------------------------------------------------------ Dockerfile
def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\") if pending else stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def test_dockerfile_parses_copies_existing_paths_and_runs_as_non_root():
    instructions = _dockerfile_instructions()
    keywords = {k for k, _ in instructions}
    assert keywords <= {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "CMD", "LABEL", "EXPOSE"}, keywords
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    assert re.match(r"(nvidia/cuda|pytorch/pytorch):\S*cudnn\S*devel", args["BASE_IMAGE"]), args["BASE_IMAGE"]
    assert args["VARIANT"] == "gpu", "GPU by default; --build-arg VARIANT=cpu builds the CPU variant"
    allowed = [
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    ]
    for keyword, arguments in instructions:
        if keyword == "COPY":
            *sources, _ = arguments.split()
            for source in (s for s in sources if not s.startswith("--")):
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
                assert source.rstrip("/") in allowed, f".dockerignore keeps {source} out of the build context"
    users = [a for k, a in instructions if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    assert not [a for k, a in instructions if k in ("ENV", "ARG") and SECRET_NAME.search(a.split("=")[0])]
    assert any(k == "RUN" and "DS_BUILD_FUSED_ADAM=1" in a for k, a in instructions), "prebuild DeepSpeed GPU ops"


def test_dockerfile_versions_equal_pyproject_pins():
    instructions = _dockerfile_instructions()
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    requirements = _pyproject_requirements()
    packages = {"TORCH_VERSION": "torch", "DEEPSPEED_VERSION": "deepspeed", "FLASH_ATTN_VERSION": "flash-attn"}
    for arg, package in packages.items():
        assert args[arg] in requirements[package].specifier, f"Dockerfile {arg}={args[arg]} vs {requirements[package]}"
        if str(requirements[package].specifier).startswith("=="):
            assert str(requirements[package].specifier) == f"=={args[arg]}"
    python_requirement = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f"{args['PYTHON_VERSION']}.0" in SpecifierSet(python_requirement)
    runs = " ".join(a for k, a in instructions if k == "RUN")
    # The GPU image installs pyproject's dependencies plus its gpu and server extras, read from pyproject itself.
    assert 'extras="gpu,server"' in runs and "['optional-dependencies'][e]" in runs, "install the GPU extras"
    assert "pip_step dependencies -r /tmp/requirements.txt" in runs


def test_manifests_run_the_tag_and_user_the_dockerfile_builds(rendered):
    """The GPU image's tag is `<pyproject version>-<TORCH_CUDA>` (as `make image IMAGE_VARIANT=gpu` tags it), its last
    user is the manifests' runAsUser, and the files every RayJob entrypoint names are copied under its WORKDIR."""
    instructions = _dockerfile_instructions()
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    (image,) = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())["images"]
    assert image["newTag"] == f"{version}-{args['TORCH_CUDA']}", image
    uid = re.search(r"useradd .*--uid (\d+)", " ".join(a for k, a in instructions if k == "RUN")).group(1)
    assert [a for k, a in instructions if k == "USER"][-1] == f"{uid}:{uid}"
    for where, pod in _pod_specs(rendered):
        if "/" in where:  # Ray pods run the image's user
            assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (int(uid),) * 2
    workdir = [a for k, a in instructions if k == "WORKDIR"][-1]
    copied = {dest.removeprefix("./").rstrip("/"): src.rstrip("/") for k, a in instructions if k == "COPY"
              for *srcs, dest in [a.split()] for src in srcs}  # fmt: skip
    assert workdir == "/app" and copied.get("jobs") == "jobs", "jobs/ lands in the working directory of `ray start`"
    for job in _of_kind(rendered, "RayJob"):
        named = [t for t in job["spec"]["entrypoint"].split() if t.endswith((".py", ".yaml"))]
        assert named and all((ROOT / t).is_file() and t.startswith("jobs/") for t in named), job["metadata"]["name"]
    console = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert console == {"gemb": "gemb_dist.cli:main"}, "the smoke and the README call `gemb`"
