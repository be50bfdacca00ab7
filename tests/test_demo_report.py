"""The quickstart's final table, built from `gemb eval` results files written in the test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "demo"))  # the quickstart's scripts
from demo_report import build_report, format_markdown, main  # noqa: E402


def write_results(path: Path, ndcg_by_dim: dict[int, float], recall: float = 0.9) -> Path:
    """The layout `gemb eval --out` writes: {"dims", "tasks": {task: {dim: {metric: value}}}}."""
    tasks = {
        "retrieval": {
            str(d): {"ndcg_at_10": v, "map_at_10": v / 2, "recall_at_100": recall} for d, v in ndcg_by_dim.items()
        }
    }
    path.write_text(json.dumps({"model": str(path.stem), "dims": list(ndcg_by_dim), "tasks": tasks, "info": {}}))
    return path


@pytest.fixture
def results(tmp_path: Path) -> list[tuple[str, Path]]:
    return [
        ("base", write_results(tmp_path / "base.json", {96: 0.30, 384: 0.40})),
        ("ft-a", write_results(tmp_path / "a.json", {96: 0.50, 384: 0.61})),
        ("ft-b", write_results(tmp_path / "b.json", {96: 0.52, 384: 0.60})),
        ("soup", write_results(tmp_path / "soup.json", {96: 0.55, 384: 0.58})),
    ]


def test_rows_in_order_columns_per_metric_and_dim(results):
    report = build_report(results, ["retrieval.ndcg_at_10", "retrieval.recall_at_100"])
    assert report.labels == ["nDCG@10@96", "nDCG@10@384", "R@100@96", "R@100@384"]
    assert list(report.rows) == ["base", "ft-a", "ft-b", "soup"]
    assert report.rows["ft-b"] == [0.52, 0.60, 0.9, 0.9]
    assert report.verdicts == []


def test_soup_verdict_is_stated_both_ways(results):
    report = build_report(results, ["retrieval.ndcg_at_10"], soup="soup", ingredients=["ft-a", "ft-b"])
    # dim 96: soup 0.55 vs best ingredient ft-b 0.52; dim 384: soup 0.58 vs best ingredient ft-a 0.61
    assert report.verdicts == [
        "nDCG@10@96: soup 0.5500 beats best ingredient ft-b 0.5200 (+0.0300)",
        "nDCG@10@384: soup 0.5800 does NOT beat best ingredient ft-a 0.6100 (-0.0300)",
    ]


def test_markdown_bolds_the_best_of_each_column(results):
    text = format_markdown(build_report(results, ["retrieval.ndcg_at_10"], "soup", ["ft-a", "ft-b"]))
    lines = text.splitlines()
    assert lines[0].split("|")[1:-1] == [" model ", " nDCG@10@96 ", " nDCG@10@384 "]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:6]}
    assert rows == {
        "base": ["0.3000", "0.4000"],
        "ft-a": ["0.5000", "**0.6100**"],
        "ft-b": ["0.5200", "0.6000"],
        "soup": ["**0.5500**", "0.5800"],
    }
    assert lines[7].startswith("- nDCG@10@96: soup")


def test_cli_writes_markdown_and_json(results, tmp_path, capsys):
    args = [f"--result={name}={path}" for name, path in results]
    md, js = tmp_path / "out" / "report.md", tmp_path / "out" / "report.json"
    assert (
        main(
            [*args, "--soup", "soup", "--ingredient", "ft-a", "--ingredient", "ft-b", "--out-md", str(md)]
            + ["--out-json", str(js)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed == md.read_text()
    data = json.loads(js.read_text())
    assert [row["model"] for row in data["rows"]] == ["base", "ft-a", "ft-b", "soup"]
    assert data["rows"][3]["scores"]["nDCG@10@384"] == 0.58
    assert len(data["verdicts"]) == 4  # nDCG@10 and R@100 at two dims


def test_bad_input_names_the_file_and_field(results, tmp_path):
    missing_dim = write_results(tmp_path / "short.json", {96: 0.1})
    with pytest.raises(ValueError, match=r"short\.json: no retrieval\.ndcg_at_10 at dim 384"):
        build_report([results[0], ("short", missing_dim)], ["retrieval.ndcg_at_10"])
    broken = tmp_path / "broken.json"
    broken.write_text('{"dims": [96],\n  oops}')
    with pytest.raises(ValueError, match=r"broken\.json: line 2: not valid JSON"):
        build_report([("broken", broken)])
    with pytest.raises(ValueError, match="results file not found"):
        build_report([("gone", tmp_path / "gone.json")])
    with pytest.raises(ValueError, match="'soup' is not one of the --result names"):
        build_report(results[:2], soup="soup", ingredients=["ft-a"])
    with pytest.raises(ValueError, match="must be unique"):
        build_report([results[0], results[0]])


def test_cli_error_is_one_line(tmp_path, capsys):
    assert main(["--result", "no-equals-sign"]) == 2
    assert capsys.readouterr().err.strip() == "demo_report: error: --result 'no-equals-sign': expected NAME=PATH.json"
