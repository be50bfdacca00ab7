"""The recipe's table: every model x validation task x MRL dim (x100), and the issue's targets checked on it."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from steps import write_atomically

# (column label, task key in the `gemb eval` JSON, metric); STS-B is the task held out of all training.
TASKS = (
    ("STS-B ρ (held out)", "sts", "spearman"),
    ("SciFact nDCG@10", "retrieval", "ndcg_at_10"),
    ("Banking77 acc", "classification", "accuracy"),
    ("MRPC AP", "pairs", "ap"),
)
HELD_OUT = "sts"
DIMS = ("96", "192", "384")


def score(result: dict, task: str, metric: str, dim: str) -> float:
    return 100.0 * float(result["tasks"][task][dim][metric])


def average(result: dict, dim: str = "384") -> float:
    return statistics.mean(score(result, t, m, dim) for _, t, m in TASKS)


def table(results: dict[str, dict]) -> str:
    header = ["model", *(f"{label} @{d}" for label, _, _ in TASKS for d in DIMS), "avg @384"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in results.items():
        cells = [f"{score(result, t, m, d):.2f}" for _, t, m in TASKS for d in DIMS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {average(result):.2f} |")
    return "\n".join(lines)


def targets(results: dict[str, dict], ingredients: list[str]) -> list[str]:
    """One line per target of the issue, with the measured margin, said either way."""
    base, out = results["base"], []
    best_name = max(ingredients, key=lambda n: average(results[n]))
    for soup in (n for n in results if n.startswith("soup")):
        s = results[soup]
        gains = {t: score(s, t, m, "384") - score(base, t, m, "384") for _, t, m in TASKS}
        ok = all(g > 0 for g in gains.values())
        out.append(
            f"{soup} beats base on every task @384: {ok} (" + ", ".join(f"{t} {g:+.2f}" for t, g in gains.items()) + ")"
        )
        keep = {t: score(s, t, m, "96") / score(s, t, m, "384") for _, t, m in TASKS}
        ok = all(k >= 0.95 for k in keep.values())
        out.append(
            f"{soup} @96 keeps >= 95% of its @384 score: {ok} ("
            + ", ".join(f"{t} {100 * k:.1f}%" for t, k in keep.items())
            + ")"
        )
        margin = average(s) - average(results[best_name])
        out.append(
            f"{soup} avg @384 vs best ingredient {best_name}: {margin:+.2f} ({'met' if margin >= 0 else 'missed'})"
        )
        gain = gains["retrieval"]
        out.append(
            f"{soup} SciFact nDCG@10 over base @384: {gain:+.2f} points (target +5: {'met' if gain >= 5 else 'missed'})"
        )
        drop = gains[HELD_OUT]
        out.append(
            f"{soup} held-out STS-B change @384: {drop:+.2f} points (target >= -1: {'met' if drop >= -1 else 'missed'})"
        )
    return out


def seed_spread(results: dict[str, dict], same_config: list[str]) -> str:
    """Mean and standard deviation over runs that differ only in seed."""
    cells = []
    for label, t, m in TASKS:
        values = [score(results[n], t, m, "384") for n in same_config]
        cells.append(f"{label} @384 {statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}")
    values = [average(results[n]) for n in same_config]
    cells.append(f"avg {statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}")
    return f"over seeds ({', '.join(same_config)}): " + "; ".join(cells)


def write_report(paths: dict[str, Path], plan, out: Path, commands: dict[str, str]) -> str:
    results = {name: json.loads(Path(path).read_text()) for name, path in paths.items()}
    ingredients = [r.name for r in plan.runs]
    lines = [table(results), "", *(f"- {line}" for line in targets(results, ingredients))]
    by_config: dict[str, list[str]] = {}
    for run in plan.runs:
        by_config.setdefault(json.dumps([run.lr, run.task_weights], sort_keys=True), []).append(run.name)
    lines += [f"- {seed_spread(results, names)}" for names in by_config.values() if len(names) >= 2]
    lines += ["", "Commands:", "", "```", *commands.values(), "```"]
    markdown = "\n".join(lines) + "\n"
    write_atomically(out / "report.md", markdown)
    payload = {"results": results, "targets": targets(results, ingredients), "commands": commands}
    write_atomically(out / "report.json", json.dumps(payload, indent=1) + "\n")
    print(markdown)
    return markdown
