"""Mine hard negatives for (query, positive) shards and write fine-tuning shards, a manifest and a report.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/mine_negatives.py --config jobs/configs/mine_negatives.yaml
    # CPU smoke run without a cluster (embeds in this process):
    python jobs/mine_negatives.py --config jobs/configs/mine_negatives.yaml --no-ray --set input=data/shards

Inside a Ray job the embedding runs in `encoder.num_actors` Ray actors. The LLM judge (when configured) is
contacted before anything else, so a wrong endpoint fails at once naming its URL. The key comes from
$GEMB_JUDGE_API_KEY (or $OPENAI_API_KEY), never from the config.
"""

from __future__ import annotations

import argparse
import json
import sys

from gemb_dist.config import ConfigError, dump_config, load_config
from gemb_dist.mining_pipeline import MineJobConfig, log_report_to_mlflow, run_mining


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML file of MineJobConfig")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="dotted override")
    parser.add_argument("--no-ray", action="store_true", help="embed in this process instead of Ray actors")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.set, cls=MineJobConfig)
    except ConfigError as err:
        print(f"mine_negatives: error: {err}", file=sys.stderr)
        return 2
    print(dump_config(config), flush=True)
    if not args.no_ray:
        import ray

        ray.init()  # inside `ray job submit` this joins the job's cluster (RAY_ADDRESS)
    try:
        report = run_mining(config)
    except ValueError as err:  # bad input (shards, endpoint): one clear line
        print(f"mine_negatives: error: {err}", file=sys.stderr)
        return 2
    logged = log_report_to_mlflow(report, config, _params(config))
    summary = {"mined": report["num_samples_out"], "fewer_than_k": report["num_queries_fewer_than_k"]}
    print(json.dumps({**summary, "output": config.output, "mlflow": logged}), flush=True)
    return 0


def _params(config: MineJobConfig) -> dict[str, str]:
    mining = config.mining.model_dump()
    params = {f"mining.{k}": str(v) for k, v in mining.items()}
    params.update({"input": config.input, "encoder": config.encoder.path, "rerank": str(config.rerank)})
    params["filter_pairs"] = str(config.filter_pairs)
    if config.judge is not None:
        params.update({"judge.model": config.judge.model, "judge.base_url": config.judge.base_url})
    return params


if __name__ == "__main__":
    sys.exit(main())
