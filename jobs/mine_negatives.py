"""Mine hard negatives for (query, positive) shards and write fine-tuning shards, a manifest and a report.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/mine_negatives.py --config jobs/configs/mine_negatives.yaml
    # CPU smoke run without a cluster (embeds in this process; --no-ray is --set encoder.num_actors=0):
    python jobs/mine_negatives.py --config jobs/configs/mine_negatives.yaml --no-ray --set input=data/shards

Inside a Ray job the embedding runs in `encoder.num_actors` Ray actors. The LLM judge (when configured) is
contacted before anything else, so a wrong endpoint fails at once naming its URL. The key comes from
$GEMB_JUDGE_API_KEY (or $OPENAI_API_KEY), never from the config. `gemb mine` runs the same code.
"""

from __future__ import annotations

import sys

from gemb_dist.mining_cli import COMMAND


def main(argv: list[str] | None = None) -> int:
    return COMMAND.main(argv, "mine_negatives")


if __name__ == "__main__":
    sys.exit(main())
