"""Generate synthetic training data (retrieval queries, classification-style counterfactual examples) from passages
with an OpenAI-compatible LLM, and write shards tagged `synthetic` plus a manifest and a report.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/synthesize.py --config jobs/configs/synthesize.yaml
    # CPU smoke run against a local endpoint:
    python jobs/synthesize.py --config jobs/configs/synthesize.yaml --set llm.base_url=http://127.0.0.1:8000/v1

The work is HTTP-bound and runs in the job's driver with `llm.max_concurrency` requests in flight. The endpoint is
probed first, so a wrong URL fails at once naming it. The key comes from $GEMB_JUDGE_API_KEY (or the variable
named by llm.api_key_env, or $OPENAI_API_KEY), never from the config. `gemb synthesize` runs the same code.
"""

from __future__ import annotations

import sys

from gemb_dist.synthesize_cli import COMMAND


def main(argv: list[str] | None = None) -> int:
    return COMMAND.main(argv, "synthesize")


if __name__ == "__main__":
    sys.exit(main())
