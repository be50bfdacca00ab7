"""`gemb data build`: validate jsonl / jsonl.gz / parquet samples and write WebDataset tar shards plus a manifest.

Each shard holds samples of one task (a writer per task), which lets fine-tuning read only the shards of the
task it is drawing from. Every shard is written to a temporary file in the output directory and renamed when
complete; the manifest is renamed into place last, so a crash never leaves a manifest naming a partial shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from gemb_dist.data.jsonl import iter_jsonl
from gemb_dist.data.manifest import ShardInfo, manifest_dict
from gemb_dist.data.schema import validate_sample
from gemb_dist.data.storage import MANIFEST_NAME
from gemb_dist.files import write_atomically

SHARD_PATTERN = "shard-%06d.tar"


@dataclass
class BuildReport:
    num_samples: int = 0
    num_shards: int = 0
    skipped_invalid: int = 0
    duplicates_removed: int = 0
    tasks: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)  # a few skipped-line messages, for the user


def iter_raw_samples(path: str) -> Iterator[tuple[str, object]]:
    """Yield `(location, decoded object or the decode error)` for every record of one input file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}:row {i}", row
        return
    if not (path.endswith(".jsonl") or path.endswith(".jsonl.gz") or path.endswith(".json")):
        raise ValueError(f"{path}: unsupported input type; use .jsonl, .jsonl.gz or .parquet")
    for number, record in iter_jsonl(path):
        yield f"{path}:{number}", record


class _ShardWriter:
    """Writes one shard to a temporary file; `finish()` hashes it and renames it into place."""

    def __init__(self, output: Path, index: int, task: str):
        self.name = SHARD_PATTERN % index
        self.final = output / self.name
        self.tmp = output / f".{self.name}.tmp-{os.getpid()}"
        self.stream = open(self.tmp, "wb")
        self.writer = wds.TarWriter(self.stream, mtime=0.0)  # fixed mtime: identical input -> identical shard
        self.task = task
        self.count = 0

    def write(self, key: str, sample: dict) -> None:
        self.writer.write({"__key__": key, "json": json.dumps(sample, ensure_ascii=False).encode("utf-8")})
        self.count += 1

    def abort(self) -> None:
        self.writer.close()
        self.stream.close()
        self.tmp.unlink(missing_ok=True)

    def finish(self) -> ShardInfo:
        self.writer.close()
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        digest = hashlib.sha256(self.tmp.read_bytes()).hexdigest()
        os.replace(self.tmp, self.final)
        return ShardInfo(self.name, self.count, ((self.task, self.count),), digest)


def build_shards(
    inputs: list[str],
    output: str,
    samples_per_shard: int = 10_000,
    dedupe: bool = False,
    skip_invalid: bool = False,
) -> BuildReport:
    """Write shards + manifest to `output` (must not already hold a dataset). Returns what was written/skipped."""
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    for path in inputs:
        if not os.path.isfile(path):
            raise ValueError(f"{path}: input file not found")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST_NAME).exists():
        raise ValueError(f"{out}: already holds a dataset ({MANIFEST_NAME}); choose an empty output directory")
    report = BuildReport()
    writers: dict[str, _ShardWriter] = {}
    shards: list[ShardInfo] = []
    seen_content: set[str] = set()
    seen_ids: dict[str, str] = {}  # id -> where it was first seen
    try:
        for where, raw in (item for path in inputs for item in iter_raw_samples(path)):
            try:
                if isinstance(raw, Exception):
                    raise raw
                sample = validate_sample(raw, where)
                content_id = _content_id(sample)
                if dedupe and content_id in seen_content:
                    report.duplicates_removed += 1
                    continue
                seen_content.add(content_id)
                sample["id"] = _unique_id(sample, raw, where, seen_ids)
            except ValueError as err:
                if not skip_invalid:
                    raise
                report.skipped_invalid += 1
                if len(report.first_errors) < 5:
                    report.first_errors.append(str(err))
                continue
            task = sample["task"]
            writer = writers.get(task)
            if writer is None:
                writer = writers[task] = _ShardWriter(out, len(shards) + len(writers), task)
            writer.write(f"{report.num_samples:012d}", sample)
            report.num_samples += 1
            report.tasks[task] = report.tasks.get(task, 0) + 1
            if writer.count >= samples_per_shard:
                shards.append(writers.pop(task).finish())
        shards.extend(writer.finish() for writer in writers.values())
        writers.clear()
    finally:
        for writer in writers.values():  # an error left these partial: remove them, never rename them
            writer.abort()
    if not shards:
        raise ValueError(f"no valid samples in {', '.join(inputs)}")
    shards.sort(key=lambda s: s.path)
    report.num_shards = len(shards)
    extra = {"skipped_invalid": report.skipped_invalid, "duplicates_removed": report.duplicates_removed}
    write_atomically(out / MANIFEST_NAME, json.dumps(manifest_dict(shards, extra), indent=1))
    return report


def _content_id(sample: dict) -> str:
    payload = json.dumps([sample["task"], sample["query"], sample["positive"], sample["negatives"]])
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=16).hexdigest()


def _unique_id(sample: dict, raw: dict, where: str, seen_ids: dict[str, str]) -> str:
    """Ids identify samples in audits and logs, so they must be unique within a dataset."""
    sample_id = sample["id"]
    if sample_id in seen_ids:
        if raw.get("id") is not None:
            raise ValueError(f"{where}: duplicate id {sample_id!r} (first seen at {seen_ids[sample_id]})")
        # the same content twice without --dedupe: keep both, told apart by the occurrence number
        occurrence = 2
        while f"{sample_id}#{occurrence}" in seen_ids:
            occurrence += 1
        sample_id = f"{sample_id}#{occurrence}"
    seen_ids[sample_id] = where
    return sample_id
