"""The quickstart's final table: one row per model, one column per metric@dim, from `gemb eval --out` JSON files.

    python recipes/demo/demo_report.py --result base=eval/base.json --result soup=eval/soup.json \
        --soup soup --ingredient finetune-a --ingredient finetune-b --out-md report.md --out-json report.json

Rows keep the order given. With `--soup` and `--ingredient`, a verdict line per column says whether the soup beats
the best of its ingredients; a soup that does not is reported as such.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_METRICS = ("retrieval.ndcg_at_10", "retrieval.recall_at_100")
METRIC_LABELS = {"ndcg_at_10": "nDCG@10", "map_at_10": "MAP@10", "recall_at_100": "R@100"}


@dataclass(frozen=True)
class Column:
    task: str
    metric: str
    dim: int

    @property
    def label(self) -> str:
        return f"{METRIC_LABELS.get(self.metric, self.metric)}@{self.dim}"


@dataclass(frozen=True)
class Report:
    columns: list[Column]
    rows: dict[str, list[float]]  # model name -> one score per column
    verdicts: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "columns": [{"label": c.label, "task": c.task, "metric": c.metric, "dim": c.dim} for c in self.columns],
            "rows": [
                {"model": name, "scores": dict(zip(self.labels, s, strict=True))} for name, s in self.rows.items()
            ],
            "verdicts": self.verdicts,
        }

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.columns]


def parse_result_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--result {text!r}: expected NAME=PATH.json")
    return name, Path(path)


def load_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: results file not found (written by `gemb eval --out`)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {err.lineno}: not valid JSON: {err.msg}") from None
    if not isinstance(results, dict) or "dims" not in results or "tasks" not in results:
        raise ValueError(f"{path}: not a `gemb eval` results file (needs 'dims' and 'tasks')")
    return results


def _score(results: dict[str, Any], path: Path, column: Column) -> float:
    try:
        return float(results["tasks"][column.task][str(column.dim)][column.metric])
    except KeyError:
        raise ValueError(
            f"{path}: no {column.task}.{column.metric} at dim {column.dim}; evaluate every model with the same "
            f"--dims and task files"
        ) from None


def build_report(
    results: Sequence[tuple[str, Path]],
    metrics: Sequence[str] = DEFAULT_METRICS,
    soup: str | None = None,
    ingredients: Sequence[str] = (),
) -> Report:
    """Scores of every model at every (metric, dim) of the first results file; all files must have them."""
    if not results:
        raise ValueError("give at least one --result NAME=PATH.json")
    loaded = [(name, path, load_results(path)) for name, path in results]
    names = [name for name, _, _ in loaded]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    for name in [soup, *ingredients] if soup else ingredients:
        if name not in names:
            raise ValueError(f"--soup/--ingredient {name!r} is not one of the --result names {names}")
    dims = [int(d) for d in loaded[0][2]["dims"]]
    columns = []
    for spec in metrics:
        task, sep, metric = spec.partition(".")
        if not sep:
            raise ValueError(f"--metric {spec!r}: expected TASK.METRIC, e.g. retrieval.ndcg_at_10")
        columns.extend(Column(task, metric, dim) for dim in dims)
    rows = {name: [_score(data, path, c) for c in columns] for name, path, data in loaded}
    verdicts = soup_verdicts(columns, rows, soup, ingredients) if soup and ingredients else []
    return Report(columns, rows, verdicts)


def soup_verdicts(
    columns: list[Column], rows: dict[str, list[float]], soup: str, ingredients: Sequence[str]
) -> list[str]:
    """Per column: the soup against its best ingredient, stated whichever way it goes."""
    lines = []
    for i, column in enumerate(columns):
        best = max(ingredients, key=lambda name: rows[name][i])
        delta = rows[soup][i] - rows[best][i]
        outcome = "beats" if delta > 0 else "ties" if delta == 0 else "does NOT beat"
        lines.append(f"{column.label}: {soup} {rows[soup][i]:.4f} {outcome} best ingredient {best} {rows[best][i]:.4f}")
        lines[-1] += f" ({delta:+.4f})"
    return lines


def format_markdown(report: Report) -> str:
    """A Markdown table (also readable as plain text), the best score per column in bold, then the verdicts."""
    best = [max(scores[i] for scores in report.rows.values()) for i in range(len(report.columns))]
    header = ["model", *report.labels]
    body = [
        [name, *(f"**{s:.4f}**" if s == best[i] else f"{s:.4f}" for i, s in enumerate(scores))]
        for name, scores in report.rows.items()
    ]
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in body)]
    if report.verdicts:
        out += ["", *(f"- {v}" for v in report.verdicts)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--result", action="append", default=[], metavar="NAME=PATH", help="a row (in order)")
    parser.add_argument("--metric", action="append", metavar="TASK.METRIC", help="columns (default: nDCG@10, R@100)")
    parser.add_argument("--soup", help="the row that is the soup")
    parser.add_argument("--ingredient", action="append", default=[], help="a row that is one of the soup's ingredients")
    parser.add_argument("--out-md", type=Path, help="write the table here (Markdown)")
    parser.add_argument("--out-json", type=Path, help="write the table here (JSON)")
    args = parser.parse_args(argv)
    try:
        results = [parse_result_arg(text) for text in args.result]
        report = build_report(results, args.metric or DEFAULT_METRICS, args.soup, args.ingredient)
    except ValueError as err:
        print(f"demo_report: error: {err}", file=sys.stderr)
        return 2
    table = format_markdown(report)
    print(table, end="")
    for path, text in ((args.out_md, table), (args.out_json, json.dumps(report.to_json(), indent=2) + "\n")):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
