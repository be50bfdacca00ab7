"""ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
    python jobs/evaluate.py --config jobs/configs/evaluate.yaml

CPU run without a cluster (encodes in this process, like `gemb eval`):

    python jobs/evaluate.py --config jobs/configs/evaluate.yaml --no-ray --set model=runs/soup --set out=/tmp/r.json

Evaluates a model on MTEB-style tasks (STS, retrieval, classification, clustering, pairs) at every MRL dim.
Inside a Ray job the corpus is encoded by `ray_actors` Ray actors on the job's cluster (`--no-ray` is
`--set ray_actors=0`); metrics are computed in the driver. Writes the results JSON, the table and the MRL curve
(PNG) beside `out`, prints the table, and logs them to MLflow when a tracking URI is configured. Paths must be
absolute or on shared storage: a job's working dir is a temporary copy. `gemb eval` runs the same code.
"""

from __future__ import annotations

import sys

from gemb_dist.evaluate.cli import COMMAND


def main(argv: list[str] | None = None) -> int:
    return COMMAND.main(argv, "evaluate")


if __name__ == "__main__":
    sys.exit(main())
