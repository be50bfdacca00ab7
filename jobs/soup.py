"""ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/soup.py --config jobs/configs/soup.yaml

CPU run without a cluster (the soup is made in this process):

    python jobs/soup.py --config jobs/configs/soup.yaml --no-ray --set output_dir=/tmp/gemb-soup

Averages fine-tuned checkpoints into a model soup (uniform, weighted, or greedy by a held-out score).
The soup runs inside one Ray task (`ray.init()` joins the job's cluster), so it executes on a cluster node that
mounts the run storage; give absolute (or shared-storage) paths, since a job's working dir is a temporary copy.
Ingredients are model dirs (`<storage>/<run>/model`), ZeRO checkpoints or MLflow run ids (see gemb_dist/soup.py).
Prints the soup's lineage (ingredients, weights, held-out scores) as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gemb_dist.config import ConfigError, dump_config, load_config
from gemb_dist.soup import SoupConfig, make_soup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML file of SoupConfig")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="dotted override")
    parser.add_argument("--no-ray", action="store_true", help="make the soup in this process")
    return parser.parse_args(argv)


def soup_task(raw_config: dict[str, Any]) -> dict[str, Any]:
    """Runs on a cluster node: the whole soup, returning its lineage."""
    import torch

    config = SoupConfig.model_validate(raw_config)
    torch.set_num_threads(max(1, int(config.num_cpus)))
    result = make_soup(config)
    return {"output_dir": str(result.output_dir), **result.lineage}


def run_on_ray(config: SoupConfig) -> dict[str, Any]:
    import ray

    ray.init()  # inside `ray job submit` this joins the job's cluster (RAY_ADDRESS)
    task = ray.remote(num_cpus=config.num_cpus, max_retries=0)(soup_task)
    return ray.get(task.remote(config.model_dump()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.set, cls=SoupConfig)
    except ConfigError as err:
        print(f"soup: error: {err}", file=sys.stderr)
        return 2
    print(dump_config(config), flush=True)
    try:
        lineage = soup_task(config.model_dump()) if args.no_ray else run_on_ray(config)
    except ValueError as err:  # bad ingredients (mismatch, missing files): one clear line
        print(f"soup: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(lineage), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
