"""Greedy soup selection on the selection slices (`<out>/select`, never the table's validation slices).

Each ingredient is scored by the mean over the trained tasks (SciFact nDCG@10, Banking77 accuracy, MRPC AP) at the
full dim; ingredients are ranked by it and each next one is kept only if the uniform soup with it scores higher
(`gemb_dist.soup.greedy_select`, Wortsman et al. 2022). STS-B is not scored: it is the task held out of the whole
recipe. Writes the choice, every score and every trial as JSON; the driver then makes the soup with the soup job
(uniform over the chosen ingredients), so the soup's own lineage names exactly what was averaged.

    python recipes/public/greedy.py --select recipe_out/public/select --out recipe_out/public/soups/greedy.json \
        --max-length 256 --dim 384 NAME=MODEL_DIR ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steps import check_input, write_atomically  # noqa: E402  (recipes/public is a folder of scripts)

from gemb_dist.evaluate.encoders import load_encoder  # noqa: E402
from gemb_dist.evaluate.runner import MAIN_METRIC, TaskFiles, evaluate, load_tasks  # noqa: E402
from gemb_dist.soup import average_model_dirs, greedy_select  # noqa: E402


def selection_files(select: Path) -> TaskFiles:
    check_input(select / "scifact" / "corpus.jsonl", "prepare")
    banking = f"{select / 'banking77_train.csv'},{select / 'banking77_test.csv'}"
    return TaskFiles(retrieval=str(select / "scifact"), classification=banking, pairs=str(select / "mrpc.csv"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--select", required=True, help="the prepare step's select/ folder")
    parser.add_argument("--out", required=True, help="JSON file for the choice and the scores")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per text (as the table is scored)")
    parser.add_argument("--dim", type=int, default=384, help="MRL dim the selection is scored at")
    parser.add_argument("ingredients", nargs="+", metavar="NAME=MODEL_DIR")
    args = parser.parse_args(argv)
    dirs = dict(item.split("=", 1) for item in args.ingredients)
    files = selection_files(Path(args.select))
    loaded = load_tasks(files)
    scores: dict[tuple[str, ...], dict[str, float]] = {}

    def score_dir(model_dir: Path) -> dict[str, float]:
        encoder = load_encoder(str(model_dir), progress=False, max_length=args.max_length)
        results = evaluate(encoder, files, dims=[args.dim], loaded=loaded)["tasks"]
        per_task = {t: float(results[t][str(args.dim)][MAIN_METRIC[t]]) for t in results}
        return {**per_task, "mean": statistics.mean(per_task.values())}

    with tempfile.TemporaryDirectory(prefix="greedy-") as scratch:

        def score(selection) -> float:
            key = tuple(selection)
            if key not in scores:
                if len(key) == 1:
                    scores[key] = score_dir(Path(dirs[key[0]]))
                else:
                    trial = Path(scratch) / f"trial-{len(scores)}"
                    trial.mkdir()
                    average_model_dirs([Path(dirs[n]) for n in key], None, trial)
                    scores[key] = score_dir(trial)
            print(f"greedy: {' + '.join(key)}: {scores[key]}", flush=True)
            return scores[key]["mean"]

        result = greedy_select(list(dirs), score)
    payload = {
        "selected": result.selected,
        "score": result.score,
        "scores": {" + ".join(k): v for k, v in scores.items()},
        "trials": result.trials,
        "dim": args.dim,
        "max_length": args.max_length,
    }
    write_atomically(Path(args.out), json.dumps(payload, indent=1) + "\n")
    print(json.dumps({"selected": result.selected, "score": result.score}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
