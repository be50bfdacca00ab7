"""Fine-tuning (stage 2): (query, positive, hard negatives) mixtures, every global batch drawn from one task.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/finetune.py --config jobs/configs/<name>.yaml [--set key=value ...]

CPU smoke run (tiny BERT, 2 CPU workers, local Ray head and MLflow from cluster/local/start.sh), starting from the
model a pre-finetuning run wrote to `<ray.storage_path>/<run>/model` (or any backbone via model.name_or_path):

    gemb data build --input triples.jsonl --output /tmp/gemb-smoke/ft_shards
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/finetune.py --config jobs/configs/smoke_cpu.yaml --set train.stage=finetune \
        --set data.mode=finetune --set data.num_negatives=1 --set data.shards=/tmp/gemb-smoke/ft_shards \
        --set train.init_from=$HOME/runs/<prefinetune-run>/model

`--set train.resume=true --set train.run_name=NAME` (or its aliases `--resume --run-name NAME`, or the same
fields in the YAML) continues a run from its latest checkpoint; without train.resume every submission is a fresh
run (a unique name unless train.run_name is set, and an existing name is refused).
"""

import sys

from gemb_dist.train.job import run_job

if __name__ == "__main__":
    sys.exit(run_job("finetune", description=__doc__.split("\n")[0]))
