"""A minimal Kustomize renderer for tests on machines without `kubectl`/`kustomize`.

It implements exactly the features cluster/kuberay/kustomization.yaml uses (resources, labels, images,
configMapGenerator without hash suffixes, inline JSON6902 patches, whole-field replacements) and rejects any
other key, so a kustomization that grows past it fails loudly instead of rendering something else. When a
kustomize binary is present, tests/test_deploy.py checks that both renderings agree.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_KEYS = {
    "apiVersion",
    "kind",
    "labels",
    "resources",
    "images",
    "configMapGenerator",
    "generatorOptions",
    "patches",
    "replacements",
}


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a manifest file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build directory` would print (order aside)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED_KEYS
    if unknown:
        raise ValueError(f"{directory}/kustomization.yaml: keys this renderer does not implement: {sorted(unknown)}")
    objects = [doc for name in kustomization.get("resources", []) for doc in load_documents(directory / name)]
    objects += _generate_config_maps(kustomization)
    for patch in kustomization.get("patches", []):
        _apply_patch(objects, patch)
    for label_set in kustomization.get("labels", []):
        _apply_labels(objects, label_set)
    for image in kustomization.get("images", []):
        _apply_image(objects, image)
    for replacement in kustomization.get("replacements", []):
        _apply_replacement(objects, replacement)
    return objects


def _generate_config_maps(kustomization: dict) -> list[dict]:
    if kustomization.get("configMapGenerator") and not kustomization.get("generatorOptions", {}).get(
        "disableNameSuffixHash"
    ):
        raise ValueError("configMapGenerator without generatorOptions.disableNameSuffixHash is not implemented")
    maps = []
    for generator in kustomization.get("configMapGenerator", []):
        if set(generator) - {"name", "literals", "options"}:
            raise ValueError(f"configMapGenerator {generator['name']}: only `literals` and `options` are implemented")
        data = dict(literal.split("=", 1) for literal in generator.get("literals", []))
        metadata: dict[str, Any] = {"name": generator["name"]}
        if generator.get("options", {}).get("labels"):
            metadata["labels"] = dict(generator["options"]["labels"])
        maps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return maps


def _selected(obj: dict, selector: dict) -> bool:
    return all(
        obj.get(key) == value if key in ("kind", "apiVersion") else obj["metadata"].get(key) == value
        for key, value in selector.items()
    )


def _apply_patch(objects: list[dict], patch: dict) -> None:
    operations = yaml.safe_load(patch["patch"])
    if not isinstance(operations, list):
        raise ValueError("only inline JSON6902 patches (a list of operations) are implemented")
    for obj in (o for o in objects if _selected(o, patch["target"])):
        for op in operations:
            *parents, leaf = [part.replace("~1", "/").replace("~0", "~") for part in op["path"].split("/")[1:]]
            node = obj
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            if op["op"] == "replace" and leaf not in node:
                raise ValueError(f"patch replaces missing path {op['path']} in {obj['kind']}/{obj['metadata']['name']}")
            if op["op"] not in ("add", "replace"):
                raise ValueError(f"patch op {op['op']!r} is not implemented")
            node[leaf] = copy.deepcopy(op["value"])


def _apply_labels(objects: list[dict], label_set: dict) -> None:
    if label_set.get("includeSelectors") or label_set.get("includeTemplates"):
        raise ValueError("labels with includeSelectors/includeTemplates are not implemented")
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(label_set["pairs"])


def _apply_image(objects: list[dict], image: dict) -> None:
    new = f"{image.get('newName', image['name'])}:{image['newTag']}"

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        if container.get("image", "").split(":")[0] == image["name"]:
                            container["image"] = new
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(objects)


def _apply_replacement(objects: list[dict], replacement: dict) -> None:
    source_selector = {k: v for k, v in replacement["source"].items() if k != "fieldPath"}
    sources = [o for o in objects if _selected(o, source_selector)]
    if len(sources) != 1:
        raise ValueError(f"replacement source {source_selector} matches {len(sources)} objects, expected 1")
    value = _get(sources[0], replacement["source"]["fieldPath"])
    for target in replacement["targets"]:
        create = target.get("options", {}).get("create", False)
        for obj in (o for o in objects if _selected(o, target["select"])):
            for field_path in target["fieldPaths"]:
                _set(obj, field_path, copy.deepcopy(value), create)


def _get(obj: dict, field_path: str) -> Any:
    for part in field_path.split("."):
        obj = obj[part]
    return obj


def _set(obj: dict, field_path: str, value: Any, create: bool) -> None:
    *parents, leaf = field_path.split(".")
    for part in parents:
        if part not in obj and not create:
            return
        obj = obj.setdefault(part, {})
    if leaf in obj or create:
        obj[leaf] = value
