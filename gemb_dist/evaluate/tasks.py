"""Readers of evaluation files (STS, BEIR retrieval, classification, clustering, pairs) with errors that name
the file and line of bad input."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gemb_dist.data.jsonl import read_jsonl


@dataclass
class STSData:
    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]
    num_skipped: int  # rows without a gold score (MTEB drops them)


@dataclass
class RetrievalData:
    corpus: dict[str, str]  # doc id -> "title text"
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[str]


@dataclass
class PairData:
    sentence1: list[str]
    sentence2: list[str]
    labels: list[int] = field(default_factory=list)


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {what} file not found")
    return path


def _rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a CSV, TSV (by suffix) or JSONL file; a CSV header must name every column, a
    missing value (short row, absent JSON field) reads as None for the caller to judge."""
    if path.suffix in (".jsonl", ".json"):
        yield from read_jsonl(path)
        return
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}:1: header {reader.fieldnames} lacks column(s) {missing}")
        for row in reader:
            yield reader.line_num, row


def _text(path: Path, line_no: int, row: dict, column: str) -> str:
    value = row.get(column)
    if value is None:
        raise ValueError(f"{path}:{line_no}: {column} is missing")
    if not isinstance(value, str):
        raise ValueError(f"{path}:{line_no}: {column} must be a string, got {value!r}")
    return value


def read_sts(path: str | Path) -> STSData:
    """`sentence1, sentence2, score` rows; a row with an empty score is skipped and counted, NaN is an error."""
    path = _existing(path, "STS")
    data = STSData([], [], [], 0)
    for line_no, row in _rows(path, ("sentence1", "sentence2", "score")):
        raw = row.get("score")
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            data.num_skipped += 1
            continue
        try:
            score = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{line_no}: score {raw!r} is not a number") from None
        if not math.isfinite(score):
            raise ValueError(f"{path}:{line_no}: score is {raw!r}; gold scores must be finite numbers")
        data.sentence1.append(_text(path, line_no, row, "sentence1"))
        data.sentence2.append(_text(path, line_no, row, "sentence2"))
        data.scores.append(score)
    if len(data.scores) < 2:
        raise ValueError(f"{path}: needs at least 2 scored pairs, found {len(data.scores)}")
    return data


def _read_texts_by_id(path: Path) -> dict[str, str]:
    """`_id` -> text of a BEIR jsonl file; a title, when present, goes before the text (MTEB's `title + " " + text`)."""
    items: dict[str, str] = {}
    for line_no, row in _rows(path, ("_id", "text")):
        if row.get("_id") is None:
            raise ValueError(f"{path}:{line_no}: _id is missing")
        item_id = str(row["_id"])
        if item_id in items:
            raise ValueError(f"{path}:{line_no}: duplicate _id {item_id!r}")
        items[item_id] = (str(row.get("title") or "") + " " + _text(path, line_no, row, "text")).strip()
    if not items:
        raise ValueError(f"{path}: no entries")
    return items


def read_retrieval(directory: str | Path, split: str = "test") -> RetrievalData:
    """A BEIR dir: corpus.jsonl (_id, title, text), queries.jsonl (_id, text), qrels/<split>.tsv with header."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: retrieval directory not found")
    corpus_path = _existing(directory / "corpus.jsonl", "corpus")
    corpus = _read_texts_by_id(corpus_path)
    queries = _read_texts_by_id(_existing(directory / "queries.jsonl", "queries"))
    qrels_path = _existing(directory / "qrels" / f"{split}.tsv", "qrels")
    qrels: dict[str, dict[str, int]] = {}
    for line_no, row in _rows(qrels_path, ("query-id", "corpus-id", "score")):
        qid, did = row["query-id"], row["corpus-id"]
        if qid not in queries:
            raise ValueError(f"{qrels_path}:{line_no}: query-id {qid!r} is not in {directory / 'queries.jsonl'}")
        if did not in corpus:
            raise ValueError(f"{qrels_path}:{line_no}: corpus-id {did!r} is not in {corpus_path}")
        try:
            qrels.setdefault(qid, {})[did] = int(row["score"])
        except ValueError:
            raise ValueError(f"{qrels_path}:{line_no}: score {row['score']!r} is not an integer") from None
    if not qrels:
        raise ValueError(f"{qrels_path}: no relevance judgements")
    # Only judged queries are scored (trec_eval ignores the rest); encoding the others would be wasted work.
    return RetrievalData(corpus=corpus, queries={q: t for q, t in queries.items() if q in qrels}, qrels=qrels)


def read_labelled(path: str | Path, what: str = "classification") -> LabelledTexts:
    """`text,label` rows; an empty label or a file with no rows is an error."""
    path = _existing(path, what)
    data = LabelledTexts([], [])
    for line_no, row in _rows(path, ("text", "label")):
        label = str(row["label"]).strip() if row.get("label") is not None else ""
        if not label:
            raise ValueError(f"{path}:{line_no}: empty label")
        data.texts.append(_text(path, line_no, row, "text"))
        data.labels.append(label)
    if not data.labels:
        raise ValueError(f"{path}: no labelled rows; the label set is empty")
    if len(set(data.labels)) < 2:
        raise ValueError(f"{path}: only one label ({data.labels[0]!r}); {what} needs at least two")
    return data


def read_classification(spec: str) -> tuple[LabelledTexts, LabelledTexts]:
    """'TRAIN,TEST' paths of `text,label` CSVs."""
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"classification expects 'TRAIN,TEST' (two CSV paths), got {spec!r}")
    return read_labelled(parts[0], "classification train"), read_labelled(parts[1], "classification test")


def read_pairs(path: str | Path) -> PairData:
    """`sentence1, sentence2, label` rows with label 0 or 1; both labels must occur."""
    path = _existing(path, "pairs")
    data = PairData([], [], [])
    for line_no, row in _rows(path, ("sentence1", "sentence2", "label")):
        label = str(row.get("label")).strip()
        if label not in ("0", "1"):
            raise ValueError(f"{path}:{line_no}: label must be 0 or 1, got {row.get('label')!r}")
        data.sentence1.append(_text(path, line_no, row, "sentence1"))
        data.sentence2.append(_text(path, line_no, row, "sentence2"))
        data.labels.append(int(label))
    if set(data.labels) != {0, 1}:
        raise ValueError(
            f"{path}: needs both positive (1) and negative (0) pairs, found labels {sorted(set(data.labels))}"
        )
    return data
