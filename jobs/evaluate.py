"""ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
    python jobs/evaluate.py --config jobs/configs/evaluate.yaml

CPU run without a cluster (encodes in this process, like `gemb eval`):

    python jobs/evaluate.py --config jobs/configs/evaluate.yaml --no-ray --set model=runs/soup --set out=/tmp/r.json

Evaluates a model on MTEB-style tasks (STS, retrieval, classification, clustering, pairs) at every MRL dim.
Inside a Ray job the corpus is encoded by `ray_actors` Ray actors on the cluster (`ray.init()` joins the
job's cluster); metrics are computed in the driver. Writes the results JSON and the MRL curve (PNG) to `out`,
prints the table, and logs both to MLflow when a tracking URI is configured. Paths must be absolute or on
shared storage: a job's working dir is a temporary copy.
"""

from __future__ import annotations

import argparse
import json
import sys

from gemb_dist.config import ConfigError, dump_config, load_config
from gemb_dist.evaluate.runner import EvalConfig, run_evaluation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML file of EvalConfig")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="dotted override")
    parser.add_argument("--no-ray", action="store_true", help="encode in this process (ignores ray_actors)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.set, cls=EvalConfig)
    except ConfigError as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    if args.no_ray:
        config = config.model_copy(update={"ray_actors": 0})
    elif config.ray_actors > 0:
        import ray

        ray.init()  # inside `ray job submit` this joins the job's cluster (RAY_ADDRESS)
    print(dump_config(config), flush=True)
    try:
        results = run_evaluation(config)
    except ValueError as err:  # bad task files or model dir: one clear line
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"out": config.out, "tasks": results["tasks"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
