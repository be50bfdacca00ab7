"""recipes/public/recipe_report.py: the table holds every model of the plan, and each target line says met or
missed with the margin it measured (checked here on made-up scores whose answers are known)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "public"
sys.path.insert(0, str(RECIPE))
from recipe_report import write_report  # noqa: E402
from run import FULL  # noqa: E402

# main metric of each task at 96 / 192 / 384 dims, as fractions; the soups are built to meet or miss known targets
BASE = {"sts": (0.84, 0.86, 0.87), "retrieval": (0.70, 0.74, 0.75), "classification": (0.53, 0.55, 0.55)}
BASE["pairs"] = (0.88, 0.88, 0.88)
METRIC = {"sts": "spearman", "retrieval": "ndcg_at_10", "classification": "accuracy", "pairs": "ap"}


def result(shift: dict[str, float], keep96: float | None = None) -> dict:
    tasks = {}
    for task, values in BASE.items():
        scores = [v + shift.get(task, 0.0) for v in values]
        if keep96 is not None:
            scores[0] = keep96 * scores[2]
        tasks[task] = {d: {METRIC[task]: s} for d, s in zip(("96", "192", "384"), scores, strict=True)}
    return {"tasks": tasks, "max_length": 256}


def test_report_checks_every_target_either_way(tmp_path):
    gains = {"ft-a-s1": 0.02, "ft-b-s1": 0.01, "ft-a-s2": 0.03, "ft-b-s2": 0.0}
    results = {"base": result({}), "prefinetuned": result({"retrieval": 0.01})}
    results |= {name: result({"retrieval": g, "classification": g}) for name, g in gains.items()}
    results["soup-uniform"] = result({"retrieval": 0.06, "classification": 0.03, "pairs": 0.01, "sts": 0.001}, 0.96)
    results["soup-greedy"] = result({"retrieval": 0.02, "sts": -0.02})
    results["soup-s1"] = result({"retrieval": 0.03, "classification": 0.01})
    results["soup-s2"] = result({"retrieval": 0.05, "classification": 0.02})
    paths = {}
    for name, payload in results.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(payload))
    markdown = write_report(paths, FULL, tmp_path, {m: f"eval {m}" for m in results})
    assert all(f"| {name} |" in markdown for name in results)
    lines = json.loads((tmp_path / "report.json").read_text())["targets"]
    uniform = [line for line in lines if line.startswith("soup-uniform")]
    assert "beats base on every task @384: met" in uniform[0]
    assert "keeps >= 95% of its @384 score on every task: met" in uniform[1]
    assert "vs its best ingredient ft-a-s2: +" in uniform[2] and uniform[2].endswith("(met)")
    assert "+6.00 points (target +5: met)" in uniform[3]
    greedy = [line for line in lines if line.startswith("soup-greedy")]
    assert "beats base on every task @384: missed" in greedy[0]
    assert "keeps >= 95% of its @384 score on every task: missed" in greedy[1]  # 0.70 / 0.77 on SciFact
    assert "-2.00 points (target >= -1: missed)" in greedy[4]
    spreads = [line for line in lines if "over seeds" in line or "only in seed" in line]
    assert len(spreads) == 3  # mixture A over seeds, mixture B over seeds, the recipe (per-seed soups)
    assert "SciFact nDCG@10 @384 79.00 ± 1.41" in spreads[2]
