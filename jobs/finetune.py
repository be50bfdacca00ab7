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

`--resume --run-name NAME` continues a run from its latest checkpoint; without `--resume` every submission is a
fresh run (a unique name unless `--run-name` is given, and an existing name is refused).
"""

from __future__ import annotations

import argparse
import sys

from gemb_dist.config import ConfigError, GembConfig, dump_config, load_config

STAGE = "finetune"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (gemb_dist.config.GembConfig)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="dotted override")
    parser.add_argument("--resume", action="store_true", help="continue the run named by --run-name")
    parser.add_argument("--run-name", help="run name (default: a unique <stage>-<timestamp>-<random>)")
    return parser.parse_args(argv)


def load_job_config(args: argparse.Namespace) -> GembConfig:
    """The validated config; every mistake found here fails the job before any Ray worker starts."""
    from gemb_dist.train.packaged import resolve_packaged_models

    overrides = list(args.set) + ([f"train.run_name={args.run_name}"] if args.run_name else [])
    config = load_config(args.config, overrides)
    if config.train.stage != STAGE:
        raise ConfigError(f"{args.config}: train.stage is {config.train.stage!r}; this job runs {STAGE!r}")
    if config.data.mode != "finetune":
        raise ConfigError(
            f"{args.config}: data.mode is {config.data.mode!r}; fine-tuning draws each global batch "
            "from one task: set data.mode=finetune"
        )
    if args.resume and not config.train.run_name:
        raise ConfigError("--resume needs --run-name (or train.run_name): the run to continue")
    return resolve_packaged_models(config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from gemb_dist.train.ray_trainer import launch, prepare_run

    try:
        run = prepare_run(load_job_config(args), resume=args.resume)  # name, storage, data, MLflow: on the driver
    except (ValueError, ConnectionError) as err:
        print(f"{STAGE}: error: {err}", file=sys.stderr)
        return 2
    print(dump_config(run.config), flush=True)
    result = launch(run)
    print(f"{STAGE}: run {result.path} finished; metrics {result.metrics}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
