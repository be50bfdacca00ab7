"""ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/soup.py --config jobs/configs/soup.yaml

CPU run without a cluster (the soup is made in this process; `--no-ray` is `--set use_ray=false`):

    python jobs/soup.py --config jobs/configs/soup.yaml --no-ray --set output_dir=/tmp/gemb-soup

Averages fine-tuned checkpoints into a model soup (uniform, weighted, or greedy by a held-out score).
The soup runs inside one Ray task (`ray.init()` joins the job's cluster), so it executes on a cluster node that
mounts the run storage; give absolute (or shared-storage) paths, since a job's working dir is a temporary copy.
Ingredients are model dirs (`<storage>/<run>/model`), ZeRO checkpoints or MLflow run ids (gemb_dist/soup/).
Prints the soup's lineage (ingredients, weights, held-out scores) as one JSON line.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from gemb_dist.config_args import JobCommand
from gemb_dist.soup import SoupConfig, run_soup


def soup_task(raw_config: dict[str, Any]) -> dict[str, Any]:
    """Runs on a cluster node (or here, without Ray): the whole soup job, returning its lineage."""
    import torch

    config = SoupConfig.model_validate(raw_config)
    torch.set_num_threads(max(1, int(config.num_cpus)))
    result = run_soup(config)
    return {"output_dir": str(result.output_dir), **result.lineage}


def soup(config: SoupConfig) -> int:
    """Make the soup in one Ray task (`ray.init()` joins the job's cluster) or here; print its lineage."""
    if config.use_ray:
        import ray

        ray.init()
        task = ray.remote(num_cpus=config.num_cpus, max_retries=0)(soup_task)
        lineage = ray.get(task.remote(config.model_dump()))
    else:
        lineage = soup_task(config.model_dump())
    print(json.dumps(lineage), flush=True)
    return 0


COMMAND = JobCommand(
    SoupConfig, soup, help="Average checkpoints into a model soup.", aliases={"--no-ray": "use_ray=false"}
)


def main(argv: list[str] | None = None) -> int:
    return COMMAND.main(argv, "soup")


if __name__ == "__main__":
    sys.exit(main())
