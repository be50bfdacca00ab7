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


def met(ok: bool) -> str:
    return "met" if ok else "missed"


def soup_targets(results: dict[str, dict], soup: str, ingredients: list[str]) -> list[str]:
    """One line per target of the issue for `soup`, with the measured margin, said either way."""
    base, s = results["base"], results[soup]
    gains = {t: score(s, t, m, "384") - score(base, t, m, "384") for _, t, m in TASKS}
    out = [
        f"{soup} beats base on every task @384: {met(all(g > 0 for g in gains.values()))} ("
        + ", ".join(f"{t} {g:+.2f}" for t, g in gains.items())
        + ")"
    ]
    keep = {t: score(s, t, m, "96") / score(s, t, m, "384") for _, t, m in TASKS}
    out.append(
        f"{soup} @96 keeps >= 95% of its @384 score on every task: {met(all(k >= 0.95 for k in keep.values()))} ("
        + ", ".join(f"{t} {100 * k:.1f}%" for t, k in keep.items())
        + ")"
    )
    best = max(ingredients, key=lambda n: average(results[n]))
    margin = average(s) - average(results[best])
    out.append(f"{soup} avg @384 vs its best ingredient {best}: {margin:+.2f} ({met(margin >= 0)})")
    gain = gains["retrieval"]
    out.append(f"{soup} SciFact nDCG@10 over base @384: {gain:+.2f} points (target +5: {met(gain >= 5)})")
    drop = gains[HELD_OUT]
    out.append(f"{soup} held-out STS-B change @384: {drop:+.2f} points (target >= -1: {met(drop >= -1)})")
    return out


def spread(results: dict[str, dict], names: list[str], label: str) -> str:
    """Mean and standard deviation over `names` at 384 dims (and the 96-dim retention), per task and on average."""
    cells = []
    for column, t, m in TASKS:
        values = [score(results[n], t, m, "384") for n in names]
        keep = [100 * score(results[n], t, m, "96") / score(results[n], t, m, "384") for n in names]
        cells.append(
            f"{column} @384 {statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} "
            f"(@96 keeps {statistics.mean(keep):.1f}% ± {statistics.stdev(keep):.1f})"
        )
    values = [average(results[n]) for n in names]
    cells.append(f"avg {statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}")
    return f"{label} ({', '.join(names)}): " + "; ".join(cells)


def summary(results: dict[str, dict], plan) -> list[str]:
    lines = []
    for soup in plan.soups:
        lines += soup_targets(results, soup.name, list(soup.ingredients))
    by_config: dict[str, list[str]] = {}
    for run in plan.runs:
        by_config.setdefault(json.dumps([run.lr, run.task_weights], sort_keys=True), []).append(run.name)
    lines += [spread(results, names, "runs differing only in seed") for names in by_config.values() if len(names) > 1]
    per_seed = [s.name for s in plan.soups if s.name.startswith("soup-s")]
    if len(per_seed) > 1:
        lines.append(spread(results, per_seed, "the recipe over seeds (one soup per seed)"))
    return lines


def write_report(paths: dict[str, Path], plan, out: Path, commands: dict[str, str]) -> str:
    results = {name: json.loads(Path(path).read_text()) for name, path in paths.items()}
    lines = [table(results), "", *(f"- {line}" for line in summary(results, plan))]
    greedy = sorted((out / "soups").glob("*.json")) if (out / "soups").is_dir() else []
    for record in greedy:
        chosen = json.loads(record.read_text())
        lines.append(f"- {record.stem}: selected {chosen['selected']} (selection mean {100 * chosen['score']:.2f})")
    lines += ["", "Commands:", "", "```", *commands.values(), "```"]
    markdown = "\n".join(lines) + "\n"
    write_atomically(out / "report.md", markdown)
    payload = {"results": results, "targets": summary(results, plan), "commands": commands}
    write_atomically(out / "report.json", json.dumps(payload, indent=1) + "\n")
    print(markdown)
    return markdown
