"""Build WebDataset shards on the cluster: `gemb data build` run as a Ray task next to the shared storage.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/build_data.py --config jobs/configs/build_data.yaml

CPU smoke run (a local Ray is started):

    python jobs/build_data.py --config jobs/configs/build_data.yaml \
        --set 'input=[pairs.jsonl]' --set output=/tmp/gemb-shards

The task runs on a worker (the head of the clusters in cluster/ takes no tasks), so the inputs must be on
storage every node sees (the shared volume). The output is a directory there or an `s3://bucket/prefix`: the
shards are then built on the worker's disk and uploaded, the manifest last, so a reader never finds a manifest
naming a shard that is not there yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import ray
from pydantic import Field

from gemb_dist.config import Section, load_config
from gemb_dist.data.build import BuildReport, build_shards
from gemb_dist.data.storage import MANIFEST_NAME, Storage


class BuildDataConfig(Section):
    """What `gemb data build` takes, as a config file so the job is reproducible from its YAML."""

    input: list[str] = Field(..., min_length=1, description="Input files: .jsonl, .jsonl.gz or .parquet.")
    output: str = Field(
        ..., min_length=1, description="Output directory or s3://bucket/prefix; must not already hold a dataset."
    )
    samples_per_shard: int = Field(10_000, gt=0, description="Samples per shard.")
    dedupe: bool = Field(False, description="Drop samples whose task and texts repeat earlier ones.")
    skip_invalid: bool = Field(False, description="Skip invalid records and report counts instead of failing.")
    num_cpus: float = Field(1, gt=0, description="CPUs the build task reserves on its worker.")
    memory_gb: float | None = Field(None, gt=0, description="Memory the build task reserves; None = no reservation.")


@ray.remote
def _build_on_worker(config: BuildDataConfig) -> BuildReport:
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


def run(config: BuildDataConfig) -> BuildReport:
    """Build the shards in one Ray task with the config's resources and return its report."""
    options = {"num_cpus": config.num_cpus}
    if config.memory_gb is not None:
        options["memory"] = int(config.memory_gb * 2**30)
    return ray.get(_build_on_worker.options(**options).remote(config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file of BuildDataConfig fields.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides, cls=BuildDataConfig)
        ray.init()  # joins the job's cluster under `ray job submit`, else starts a local one
        try:
            report = run(config)
        except ray.exceptions.RayTaskError as err:  # surface the task's own error, not Ray's wrapper
            raise err.cause from None
        finally:
            ray.shutdown()
    except ValueError as err:  # bad config or bad input: one clear line, no traceback
        print(f"build_data: error: {err}", file=sys.stderr)
        return 2
    for message in report.first_errors:
        print(f"skipped: {message}", file=sys.stderr)
    print(json.dumps({"output": config.output, **dataclasses.asdict(report)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
