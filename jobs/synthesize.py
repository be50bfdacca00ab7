"""Generate synthetic training data (retrieval queries, classification-style counterfactual examples) from passages
with an OpenAI-compatible LLM, and write shards tagged `synthetic` plus a manifest and a report.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/synthesize.py --config jobs/configs/synthesize.yaml
    # CPU smoke run against a local endpoint:
    python jobs/synthesize.py --config jobs/configs/synthesize.yaml --set llm.base_url=http://127.0.0.1:8000/v1

The work is HTTP-bound and runs in the job's driver with `llm.max_concurrency` requests in flight. The endpoint is
probed first, so a wrong URL fails at once naming it. The key comes from $GEMB_JUDGE_API_KEY (or the variable
named by llm.api_key_env, or $OPENAI_API_KEY), never from the config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gemb_dist.config import ConfigError, dump_config, load_config
from gemb_dist.synthesize import REPORT_NAME, SynthesizeJobConfig, run_synthesis


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML file of SynthesizeJobConfig")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="dotted override")
    parser.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="log counters here")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.set, cls=SynthesizeJobConfig)
        print(dump_config(config), flush=True)
        report = run_synthesis(config)
    except (ConfigError, ValueError) as err:  # bad config, input or endpoint: one clear line
        print(f"synthesize: error: {err}", file=sys.stderr)
        return 2
    if args.mlflow_uri:
        import mlflow

        mlflow.set_tracking_uri(args.mlflow_uri)
        mlflow.set_experiment("gemb-dist-data")
        with mlflow.start_run(run_name=f"synthesize-{Path(config.output).name}"):
            mlflow.log_params({"input": config.input, "llm.model": config.llm.model, "tasks": len(config.tasks)})
            mlflow.log_metrics({f"llm.{k}": v for k, v in report["llm"].items()} | {"samples": report["num_samples"]})
            mlflow.log_artifact(str(Path(config.output) / REPORT_NAME))
    print(json.dumps({"samples": report["num_samples"], "output": config.output, "tasks": report["tasks"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
