"""The dataset manifest: every shard's path, sample count, task layout and sha256, written last by the build.

The plan is computed from the manifest alone, so every rank derives the same plan without reading a shard.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from gemb_dist.data.storage import Storage

MANIFEST_FORMAT = "gemb-shards/1"


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset root
    num_samples: int
    task_runs: tuple[tuple[str, int], ...]  # consecutive runs of one task, in shard order
    sha256: str

    @property
    def tasks(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for task, count in self.task_runs:
            counts[task] = counts.get(task, 0) + count
        return counts


@dataclass(frozen=True)
class Manifest:
    shards: tuple[ShardInfo, ...]
    source: str  # where it was read from, for messages

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def tasks(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for shard in self.shards:
            for task, count in shard.tasks.items():
                counts[task] = counts.get(task, 0) + count
        return dict(sorted(counts.items()))

    @property
    def fingerprint(self) -> str:
        """Identifies the data a plan was made for; a resumed run checks it before trusting a saved position."""
        payload = json.dumps([[s.path, s.num_samples, s.task_runs, s.sha256] for s in self.shards])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def manifest_dict(shards: list[ShardInfo], extra: dict) -> dict:
    """The JSON form written by the build (totals included so humans and other tools need not add them up)."""
    manifest = Manifest(tuple(shards), "")
    return {
        "format": MANIFEST_FORMAT,
        "num_samples": manifest.num_samples,
        "num_shards": len(shards),
        "tasks": manifest.tasks,
        **extra,
        "shards": [
            {
                "path": s.path,
                "num_samples": s.num_samples,
                "tasks": s.tasks,
                "task_runs": [list(run) for run in s.task_runs],
                "sha256": s.sha256,
            }
            for s in shards
        ],
    }


def load_manifest(storage: Storage) -> Manifest:
    source = storage.url(storage.manifest_name)
    try:
        raw = json.loads(storage.read_bytes(storage.manifest_name))
    except FileNotFoundError:
        raise ValueError(f"{source}: manifest not found; build the shards with `gemb data build`") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: manifest is not valid JSON: {err}") from None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{source}: not a gemb shard manifest (expected format {MANIFEST_FORMAT!r})")
    shards = []
    for i, entry in enumerate(raw.get("shards", [])):
        try:
            runs = tuple((str(task), int(count)) for task, count in entry["task_runs"])
            shard = ShardInfo(str(entry["path"]), int(entry["num_samples"]), runs, str(entry["sha256"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: shards[{i}] is malformed ({err!r})") from None
        if sum(count for _, count in runs) != shard.num_samples:
            raise ValueError(f"{source}: shards[{i}] ({shard.path}): task_runs do not add up to num_samples")
        shards.append(shard)
    if not shards:
        raise ValueError(f"{source}: the manifest lists no shards")
    return Manifest(tuple(shards), source)


def verify_shards(manifest: Manifest, storage: Storage, shard_indices: list[int]) -> list[int]:
    """Hash the given shards; raise on a sha256 mismatch, return the indices of shards that are missing.

    Missing shards are not fatal here: their samples are skipped and counted by the reader like any bad data.
    """
    missing = []
    for index in shard_indices:
        shard = manifest.shards[index]
        try:
            digest = storage.sha256(shard.path)
        except FileNotFoundError:
            missing.append(index)
            continue
        if digest != shard.sha256:
            raise ValueError(
                f"{storage.url(shard.path)}: sha256 {digest} does not match the manifest ({shard.sha256}); "
                f"the shard changed after {manifest.source} was written. Rebuild the dataset, or set "
                "data.verify_sha256=false to train on it anyway"
            )
    return missing
