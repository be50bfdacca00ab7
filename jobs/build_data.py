"""Build WebDataset shards on the cluster: `gemb data build` run as a Ray task next to the shared storage.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/build_data.py --config jobs/configs/build_data.yaml

CPU smoke run (a local Ray is started):

    python jobs/build_data.py --config jobs/configs/build_data.yaml \
        --set 'input=[pairs.jsonl]' --set output=/tmp/gemb-shards

The task runs on a worker (the head of the clusters in cluster/ takes no tasks), so the inputs must be on
storage every node sees (the shared volume). The output is a directory there or an `s3://bucket/prefix`: the
shards are then built on the worker's disk and uploaded, the manifest last (gemb_dist/data/build_job.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import ray

from gemb_dist.config_args import add_config_arguments, config_from_args
from gemb_dist.data.build import BuildReport
from gemb_dist.data.build_job import BuildDataConfig, build_dataset


def run(config: BuildDataConfig) -> BuildReport:
    """Build the shards in one Ray task with the config's resources and return its report."""
    options = {"num_cpus": config.num_cpus}
    if config.memory_gb is not None:
        options["memory"] = int(config.memory_gb * 2**30)
    return ray.get(ray.remote(build_dataset).options(**options).remote(config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, BuildDataConfig)
    try:
        config = config_from_args(parser.parse_args(argv), BuildDataConfig)
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
