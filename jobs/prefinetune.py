"""Pre-finetuning (stage 1): large noisy (query, passage) pairs, in-batch negatives over the largest global batch.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/prefinetune.py --config jobs/configs/<name>.yaml [--set key=value ...]

CPU smoke run (tiny BERT, 2 CPU workers, local Ray head and MLflow from cluster/local/start.sh):

    gemb data build --input pairs.jsonl --output /tmp/gemb-smoke/shards
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/prefinetune.py --config jobs/configs/smoke_cpu.yaml --set data.shards=/tmp/gemb-smoke/shards

`--set train.resume=true --set train.run_name=NAME` (or its aliases `--resume --run-name NAME`, or the same
fields in the YAML) continues a run from its latest checkpoint; without train.resume every submission is a fresh
run (a unique name unless train.run_name is set, and an existing name is refused).
"""

import sys

from gemb_dist.train.job import run_job

if __name__ == "__main__":
    sys.exit(run_job("prefinetune", description=__doc__.split("\n")[0]))
