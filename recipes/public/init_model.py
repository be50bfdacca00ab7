"""The model the recipe starts from: all-MiniLM-L6-v2 wrapped as a gemb model with its projection initialised by
`--projection` (`pca`: `gemb_dist.model.pca_projection` fitted on held-in training texts; `identity`: the base as
it is). Both embed exactly as the base at 384 dims; `pca` puts the directions the training texts vary most along
into the short MRL prefixes.

    python recipes/public/init_model.py --config recipes/public/prefinetune.yaml --texts recipe_out/public/source \
        --out recipe_out/public/models/init [--projection pca] [--num-texts 3000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from gemb_dist.config import load_config
from gemb_dist.model import EmbeddingModel, pca_projection
from gemb_dist.train.packaged import resolve_packaged_models


def fit_texts(source: Path, num_texts: int, seed: int) -> list[str]:
    """A seeded sample of the distinct texts of the training jsonl files (queries and positives of every task)."""
    texts: set[str] = set()
    for name in ("prefinetune.jsonl", "finetune.jsonl"):
        path = source / name
        if not path.is_file():
            raise SystemExit(f"init_model: {path} is missing; it is made by the step 'prepare'")
        for line in path.read_text(encoding="utf-8").splitlines():
            sample = json.loads(line)
            texts.update((sample["query"], sample["positive"]))
    ordered = sorted(texts)
    random.Random(seed).shuffle(ordered)
    return ordered[:num_texts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="training config whose `model` section is wrapped")
    parser.add_argument("--texts", required=True, help="the prepare step's source/ folder")
    parser.add_argument("--out", required=True, help="gemb model dir to write")
    parser.add_argument("--projection", choices=("pca", "identity"), default="pca")
    parser.add_argument("--num-texts", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    texts = fit_texts(Path(args.texts), args.num_texts, args.seed)
    model_config = resolve_packaged_models(load_config(args.config)).model
    model = EmbeddingModel.from_config(model_config.model_copy(update={"projection_init": "identity"}))
    if args.projection == "pca":
        model.projection = pca_projection(model, texts)
    model.save(args.out)
    print(json.dumps({"out": args.out, "projection": args.projection, "num_texts": len(texts)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
