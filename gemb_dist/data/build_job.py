"""The data build as a job: `BuildDataConfig` (the config of `gemb data build` and `jobs/build_data.py`) and
`build_dataset`, which writes to a local directory or, built on local disk first, to an S3 prefix.

An S3 upload sends the shards first and the manifest last, so a reader never finds a manifest naming a shard that
is not there yet.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydantic import Field, field_validator

from gemb_dist.config import Section, check_location
from gemb_dist.data.build import BuildReport, build_shards
from gemb_dist.data.storage import MANIFEST_NAME, Storage


class BuildDataConfig(Section):
    """What `gemb data build` and `jobs/build_data.py` take, so a build is reproducible from its YAML."""

    input: list[str] = Field(..., min_length=1, description="Input files: .jsonl, .jsonl.gz or .parquet.")
    output: str = Field(
        ..., min_length=1, description="Output directory or s3://bucket/prefix; must not already hold a dataset."
    )
    samples_per_shard: int = Field(10_000, gt=0, description="Samples per shard.")
    dedupe: bool = Field(False, description="Drop samples whose task and texts repeat earlier ones.")
    skip_invalid: bool = Field(False, description="Skip invalid records and report counts instead of failing.")
    num_cpus: float = Field(1, gt=0, description="jobs/build_data.py: CPUs the build task reserves on its worker.")
    memory_gb: float | None = Field(
        None, gt=0, description="jobs/build_data.py: memory the build task reserves; None = no reservation."
    )

    _output_is_a_location = field_validator("output")(lambda value: check_location(value))


def build_dataset(config: BuildDataConfig) -> BuildReport:
    """Build the shards of `config.input` into `config.output` (a directory, or an S3 prefix via local disk)."""
    if not config.output.startswith("s3://"):
        return build_shards(config.input, config.output, config.samples_per_shard, config.dedupe, config.skip_invalid)
    destination = Storage(config.output)  # validates the URL before any work
    _refuse_existing_dataset(destination)
    with tempfile.TemporaryDirectory(prefix="gemb-build-") as scratch:
        report = build_shards(config.input, scratch, config.samples_per_shard, config.dedupe, config.skip_invalid)
        _upload(Path(scratch), destination)
    return report


def _refuse_existing_dataset(destination: Storage) -> None:
    try:
        destination.open(MANIFEST_NAME).close()
    except FileNotFoundError:
        return
    raise ValueError(f"{destination.url(MANIFEST_NAME)} exists: choose an empty output prefix")


def _upload(local_dir: Path, destination: Storage) -> None:
    import boto3

    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    client = boto3.client("s3", region_name=region)
    names = sorted(p.name for p in local_dir.iterdir() if p.name != MANIFEST_NAME) + [MANIFEST_NAME]
    for name in names:
        key = f"{destination.prefix}/{name}" if destination.prefix else name
        client.upload_file(str(local_dir / name), destination.bucket, key)
