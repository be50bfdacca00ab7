"""The quickstart's data: (title, passage) pairs from the docstrings of the installed standard library."""

from __future__ import annotations

import ast
import csv
import json
import sys
import tokenize
from pathlib import Path

import pytest

from gemb_dist.data.schema import validate_sample

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "demo"))  # the quickstart's scripts
from demo_data import TASK, build_demo_data, main, split_docstring, stdlib_dir  # noqa: E402


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    build_demo_data(out)
    return out


def test_split_docstring_takes_the_first_sentence_as_title():
    doc = """Return the thing, e.g. a value.  Raises
    KeyError when it is missing.

    Longer notes.
    """
    assert split_docstring(doc) == (
        "Return the thing, e.g. a value.",
        "Raises\nKeyError when it is missing.\n\nLonger notes.",
    )
    assert split_docstring("Only a title.") == ("Only a title.", "")
    assert split_docstring("Title.\n\n  Body line one.\n  Body line two.") == (
        "Title.",
        "Body line one.\nBody line two.",
    )


def test_pairs_are_real_stdlib_docstrings(built):
    rows = read_jsonl(built / "train.jsonl") + [
        {"id": q["_id"].removeprefix("q-"), "query": q["text"]} for q in read_jsonl(built / "heldout" / "queries.jsonl")
    ]
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(rows) > 1000
    # json.dumps is documented in json/__init__.py: its pair is that docstring, split into title and body.
    source = (stdlib_dir() / "json" / "__init__.py").read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "dumps")
    title, _ = split_docstring(ast.get_docstring(node, clean=False))
    assert by_id["json.dumps"]["query"] == f"json.dumps: {title}"
    # Every training passage occurs verbatim (modulo indentation) in the source file of its module.
    for row in read_jsonl(built / "train.jsonl")[::97]:
        module = row["id"]
        candidates = []
        while module:
            base = stdlib_dir() / Path(*module.split("."))
            candidates += [base.with_suffix(".py"), base / "__init__.py"]
            module = module.rpartition(".")[0]
        path = next(p for p in candidates if p.is_file())
        with tokenize.open(path) as f:
            source_lines = " ".join(line.strip() for line in f)
        first_line = row["positive"].splitlines()[0].strip()
        assert first_line in source_lines, (row["id"], first_line)


def test_samples_are_valid_and_non_empty(built):
    rows = read_jsonl(built / "train.jsonl")
    for i, row in enumerate(rows):
        sample = validate_sample(row, f"train.jsonl:{i + 1}")
        assert sample["task"] == TASK
        assert len(sample["positive"].split()) >= 8 and sample["query"].startswith(f"{row['id']}: ")
    assert len({r["query"] for r in rows}) == len({r["positive"] for r in rows}) == len(rows)


def test_heldout_split_is_disjoint_and_a_consistent_beir_set(built):
    train = read_jsonl(built / "train.jsonl")
    heldout = built / "heldout"
    queries = read_jsonl(heldout / "queries.jsonl")
    corpus = read_jsonl(heldout / "corpus.jsonl")
    with (heldout / "qrels" / "test.tsv").open() as f:
        qrels = list(csv.DictReader(f, delimiter="\t"))
    assert 100 < len(queries) < len(train) / 5
    assert {r["id"] for r in train}.isdisjoint(q["_id"].removeprefix("q-") for q in queries)
    assert {r["query"] for r in train}.isdisjoint(q["text"] for q in queries)
    assert {r["positive"] for r in train}.isdisjoint(d["text"] for d in corpus)
    assert {q["query-id"] for q in qrels} == {q["_id"] for q in queries}
    assert {q["corpus-id"] for q in qrels} == {d["_id"] for d in corpus}
    assert all(d["text"].strip() for d in corpus) and all(q["text"].strip() for q in queries)
    pairs = read_jsonl(heldout / "pairs.jsonl")
    assert [p["label"] for p in pairs].count(1) == [p["label"] for p in pairs].count(0) == len(queries)
    positives = {(q["text"], d["text"]) for q, d in zip(queries, corpus, strict=True)}
    assert all(((p["sentence1"], p["sentence2"]) in positives) == (p["label"] == 1) for p in pairs)


def test_building_is_deterministic(built, tmp_path, capsys):
    assert main(["--output", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["num_train"] == len(read_jsonl(built / "train.jsonl"))
    for name in ["train.jsonl", "heldout/corpus.jsonl", "heldout/queries.jsonl", "heldout/qrels/test.tsv",
                 "heldout/pairs.jsonl", "stats.json"]:  # fmt: skip
        assert (tmp_path / name).read_bytes() == (built / name).read_bytes(), name
