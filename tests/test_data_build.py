"""`gemb data build`: jsonl / jsonl.gz / parquet in, WebDataset shards + manifest out, bad input named by file:line."""

from __future__ import annotations

import gzip
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from gemb_dist.cli import main
from gemb_dist.data.schema import validate_sample


def _rows(task: str, n: int, start: int = 0) -> list[dict]:
    return [
        {"task": task, "query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}"]} for i in range(start, start + n)
    ]


def test_build_all_input_kinds_readable_by_plain_webdataset(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows("qa", 7)))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in _rows("nli", 5)))
    # the first row sets the parquet schema: give it the optional id column
    parquet_rows = [{**_rows("qa", 1, start=200)[0], "id": "custom-id"}] + _rows("cls", 4, start=100)
    pq.write_table(pa.Table.from_pylist(parquet_rows), tmp_path / "c.parquet")
    out = tmp_path / "out"
    inputs = [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.parquet")]
    assert main(["data", "build", "--input", *inputs, "--output", str(out), "--set", "samples_per_shard=3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_samples"] == 17 and summary["tasks"] == {"qa": 8, "nli": 5, "cls": 4}

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 17 and manifest["tasks"] == {"cls": 4, "nli": 5, "qa": 8}
    for shard in manifest["shards"]:
        data = (out / shard["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert len(shard["tasks"]) == 1 and shard["num_samples"] <= 3
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json"] + [s["path"] for s in manifest["shards"]])

    urls = [str(out / s["path"]) for s in manifest["shards"]]
    samples = [s["json"] for s in wds.WebDataset(urls, shardshuffle=False).decode()]
    assert len(samples) == 17 and len({s["id"] for s in samples}) == 17
    assert {(s["task"], s["query"]) for s in samples} == {(r["task"], r["query"]) for r in _rows("qa", 7)} | {
        (r["task"], r["query"]) for r in _rows("nli", 5) + parquet_rows
    }
    assert any(s["id"] == "custom-id" for s in samples)
    for shard in manifest["shards"]:  # the manifest's per-shard counts match the shards' contents
        got = [s["json"]["task"] for s in wds.WebDataset(str(out / shard["path"]), shardshuffle=False).decode()]
        assert {t: got.count(t) for t in got} == shard["tasks"]


def test_bad_line_fails_with_file_and_line(tmp_path, capsys):
    lines = [json.dumps(r) for r in _rows("qa", 3)]
    lines.insert(2, json.dumps({"task": "qa", "query": "q", "positive": 5}))
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["data", "build", "--input", str(tmp_path / "a.jsonl"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a.jsonl'}:3: field 'positive' must be a string" in err
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))  # nothing partial left

    (tmp_path / "b.jsonl").write_text("\n".join([lines[0], "{not json", lines[2]]) + "\n")
    args = [
        "data",
        "build",
        "--input",
        str(tmp_path / "b.jsonl"),
        "--output",
        str(tmp_path / "o2"),
        "--set",
        "skip_invalid=true",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["skipped_invalid"] == 2
    assert f"{tmp_path / 'b.jsonl'}:2: invalid JSON" in captured.err


def test_dedupe_and_duplicate_ids(tmp_path, capsys):
    rows = _rows("qa", 3) + _rows("qa", 2)  # two exact repeats
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        main(
            [
                "data",
                "build",
                "--input",
                str(tmp_path / "a.jsonl"),
                "--output",
                str(tmp_path / "d"),
                "--set",
                "dedupe=true",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert (summary["num_samples"], summary["duplicates_removed"]) == (3, 2)
    assert main(["data", "build", "--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "k")]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 5  # kept, with distinct ids
    assert main(["data", "build", "--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "k")]) == 2
    assert "already holds a dataset" in capsys.readouterr().err

    same_id = [{**r, "id": "x"} for r in _rows("qa", 2)]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in same_id))
    assert main(["data", "build", "--input", str(tmp_path / "b.jsonl"), "--output", str(tmp_path / "e")]) == 2
    assert (
        f"{tmp_path / 'b.jsonl'}:2: duplicate id 'x' (first seen at {tmp_path / 'b.jsonl'}:1)"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "raw, message",
    [
        ([], "must be a JSON object"),
        ({"query": "q", "positive": "p"}, "missing required field 'task'"),
        ({"task": "t", "query": " ", "positive": "p"}, "field 'query' is empty"),
        ({"task": "t", "query": "q", "positive": "p", "negatives": "n"}, "'negatives' must be a list"),
        ({"task": "t", "query": "q", "positive": "p", "negatives": ["a", 3]}, r"'negatives\[1\]' must be a string"),
    ],
)
def test_schema_errors_name_location_and_field(raw, message):
    with pytest.raises(ValueError, match=f"^in.jsonl:9: .*{message}"):
        validate_sample(raw, "in.jsonl:9")


def test_schema_derives_stable_ids():
    a = validate_sample({"task": "t", "query": "q", "positive": "p", "extra": 1}, "x")
    b = validate_sample({"task": "t", "query": "q", "positive": "p", "negatives": []}, "y")
    assert a == b and "extra" not in a and a["negatives"] == []
    assert validate_sample({"task": "t", "query": "qp", "positive": "x"}, "z")["id"] != a["id"]
