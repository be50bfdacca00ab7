"""Turn the public training splits (SciFact, STS Benchmark, MRPC, Banking77) into the recipe's training jsonl and
validation sets, with every validation slice held out of all training.

    python recipes/public/prepare.py --data /path/to/public --out recipe_out/public [--quick]

Writes under `--out`:
- `source/prefinetune.jsonl`: SciFact corpus (title -> abstract) pairs, task `scifact`, no hard negatives.
- `source/finetune.jsonl`: (query, positive) pairs for mining, one task each: `scifact` (train claim -> a cited
  abstract), `mrpc` (paraphrase pairs, Quality 1), `banking77` (utterance -> its intent's name, e.g.
  "card arrival"; the other intent names become its negatives when mined).
- `val/scifact/` and `val/scifact_select/`: BEIR dirs (`corpus.jsonl`, `queries.jsonl`, `qrels/test.tsv`) of two
  disjoint slices of the train claims; `select` is only for the greedy soup, `scifact` only for the table.
- `val/stsb_dev.csv` (STS-B dev; STS-B train is not used: STS is the task held out of training),
  `val/mrpc_val.csv` (MRPC's validation file as `sentence1,sentence2,label`),
  `val/banking77_train.csv`, `val/banking77_test.csv` (a Banking77 slice for the classification probe).
- `prepare_report.json`: the counts, seed and which ids went where.

Splits are seeded (`--seed`) and depend only on the input files.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steps import write_atomically  # noqa: E402  (recipes/public is a folder of scripts, not a package)


@dataclass(frozen=True)
class Sizes:
    """How much of each source goes where; `--quick` shrinks everything to CI size."""

    val_claims: int  # SciFact train claims held out for the table
    select_claims: int  # ... and for the greedy soup's selection score
    val_distractors: int  # extra abstracts in the validation corpus beside the relevant ones
    select_distractors: int
    prefinetune_pairs: int
    mrpc_pairs: int
    banking_train: int  # Banking77 utterances used for fine-tuning
    banking_val: int  # ... held out, half as the probe's train side, half as its test side
    stsb_dev: int  # 0 = all 1500 pairs
    mrpc_val: int  # 0 = all 500 pairs
    train_claims: int = 0  # SciFact train claims for fine-tuning; 0 = all the others


FULL = Sizes(120, 60, 480, 240, 1024, 768, 1024, 1000, 0, 0)
QUICK = Sizes(16, 16, 48, 32, 64, 48, 48, 160, 200, 120, train_claims=48)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise ValueError(f"{path}: not found; --data must be the public data folder (see its README.md)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: invalid JSON: {err.msg}") from None
    return rows


def read_qrels(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise ValueError(f"{path}: not found")
    qrels: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for number, row in enumerate(csv.DictReader(f, delimiter="\t"), start=2):
            if row.get("query-id") is None or row.get("corpus-id") is None:
                raise ValueError(f"{path}:{number}: needs query-id and corpus-id")
            if int(row.get("score") or 0) > 0:
                qrels.setdefault(row["query-id"], []).append(row["corpus-id"])
    return qrels


def read_mrpc(path: Path) -> list[tuple[int, str, str]]:
    """(quality, sentence1, sentence2) rows; the files are tab-separated with a BOM and quotes inside texts."""
    if not path.is_file():
        raise ValueError(f"{path}: not found")
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            parts = line.rstrip("\n").split("\t")
            if number == 1:
                continue
            if len(parts) != 5 or parts[0] not in ("0", "1"):
                raise ValueError(f"{path}:{number}: expected 5 tab-separated fields with Quality 0/1")
            rows.append((int(parts[0]), parts[3], parts[4]))
    return rows


def read_sts(path: Path) -> list[tuple[str, str, float]]:
    """The original STS-B file: tab-separated, unquoted (`genre, file, year, id, score, s1, s2`)."""
    if not path.is_file():
        raise ValueError(f"{path}: not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 7:
                raise ValueError(f"{path}:{number}: expected at least 7 tab-separated fields")
            rows.append((parts[5], parts[6], float(parts[4])))
    return rows


def read_banking(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise ValueError(f"{path}: not found")
    with open(path, encoding="utf-8", newline="") as f:  # texts hold quoted newlines: a real CSV reader
        rows = [(r["text"], r["category"]) for r in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def intent_name(category: str) -> str:
    """`card_arrival` -> `card arrival`: the positive text a Banking77 utterance is trained towards."""
    return category.replace("_", " ")


def beir_slice(out: Path, claims: list[dict], qrels: dict, corpus: dict, distractors: list[str]) -> int:
    """A BEIR dir for `claims`: their relevant abstracts plus `distractors` as the corpus. Returns its size."""
    doc_ids = sorted({d for c in claims for d in qrels[c["_id"]]} | set(distractors))
    write_lines(out / "corpus.jsonl", [json.dumps(corpus[d]) for d in doc_ids])
    write_lines(out / "queries.jsonl", [json.dumps({"_id": c["_id"], "text": c["text"]}) for c in claims])
    rows = ["query-id\tcorpus-id\tscore"] + [f"{c['_id']}\t{d}\t1" for c in claims for d in qrels[c["_id"]]]
    write_lines(out / "qrels" / "test.tsv", rows)
    return len(doc_ids)


def write_lines(path: Path, lines: list[str]) -> None:
    write_atomically(path, "".join(line + "\n" for line in lines))


def write_csv(path: Path, header: list[str], rows: list) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_atomically(path, buffer.getvalue())


def prepare(data: Path, out: Path, sizes: Sizes, seed: int) -> dict:
    rng = random.Random(seed)
    corpus = {d["_id"]: d for d in read_jsonl(data / "scifact" / "corpus.jsonl")}
    qrels = read_qrels(data / "scifact" / "qrels" / "train.tsv")
    claims = [q for q in read_jsonl(data / "scifact" / "queries.jsonl") if qrels.get(q["_id"])]
    unknown = sorted({d for ds in qrels.values() for d in ds} - set(corpus))
    if unknown:
        raise ValueError(f"{data / 'scifact/qrels/train.tsv'}: corpus-ids not in corpus.jsonl: {unknown[:5]}")
    rng.shuffle(claims)
    val, select = claims[: sizes.val_claims], claims[sizes.val_claims : sizes.val_claims + sizes.select_claims]
    train_claims = claims[sizes.val_claims + sizes.select_claims :][: sizes.train_claims or None]
    held_docs = {d for c in val + select for d in qrels[c["_id"]]}
    others = sorted(set(corpus) - held_docs)
    rng.shuffle(others)
    report = {"seed": seed, "sizes": sizes.__dict__}
    report["scifact_val_corpus"] = beir_slice(out / "val/scifact", val, qrels, corpus, others[: sizes.val_distractors])
    select_distractors = others[sizes.val_distractors : sizes.val_distractors + sizes.select_distractors]
    report["scifact_select_corpus"] = beir_slice(out / "val/scifact_select", select, qrels, corpus, select_distractors)

    # Pre-finetuning: titles as queries of their abstracts, never the held-out claims' abstracts.
    pft_ids = [d for d in others if corpus[d]["title"].strip() and corpus[d]["text"].strip()][: sizes.prefinetune_pairs]
    pft = [{"task": "scifact", "query": corpus[d]["title"], "positive": corpus[d]["text"]} for d in pft_ids]
    write_lines(out / "source/prefinetune.jsonl", [json.dumps(s) for s in pft])

    finetune = [
        {"task": "scifact", "query": c["text"], "positive": _doc_text(corpus[d])}
        for c in train_claims
        for d in qrels[c["_id"]]
    ]
    mrpc_train = [(a, b) for quality, a, b in read_mrpc(data / "mrpc/msr-para-train.tsv") if quality == 1]
    rng.shuffle(mrpc_train)
    # One direction per pair, chosen at random: both directions in one batch would put a query's own text among
    # its in-batch documents (a false negative scoring 1), which the duplicate mask cannot see.
    for a, b in mrpc_train[: sizes.mrpc_pairs]:
        query, positive = (a, b) if rng.random() < 0.5 else (b, a)
        finetune.append({"task": "mrpc", "query": query, "positive": positive})
    banking = read_banking(data / "banking77/train.csv")
    rng.shuffle(banking)
    banking_val, banking_train = banking[: sizes.banking_val], banking[sizes.banking_val :]
    for text, category in banking_train[: sizes.banking_train]:
        finetune.append({"task": "banking77", "query": text, "positive": intent_name(category)})
    write_lines(out / "source/finetune.jsonl", [json.dumps(s) for s in finetune])

    half = len(banking_val) // 2
    write_csv(out / "val/banking77_train.csv", ["text", "label"], banking_val[:half])
    write_csv(out / "val/banking77_test.csv", ["text", "label"], banking_val[half:])
    mrpc_val = [(a, b, q) for q, a, b in read_mrpc(data / "mrpc/msr-para-val.tsv")]
    write_csv(out / "val/mrpc_val.csv", ["sentence1", "sentence2", "label"], mrpc_val[: sizes.mrpc_val or None])
    sts = read_sts(data / "stsbenchmark/sts-dev.csv")
    write_csv(out / "val/stsb_dev.csv", ["sentence1", "sentence2", "score"], sts[: sizes.stsb_dev or None])
    report["counts"] = {
        "prefinetune": len(pft),
        "finetune": {t: sum(s["task"] == t for s in finetune) for t in ("scifact", "mrpc", "banking77")},
        "scifact_claims": {"train": len(train_claims), "val": len(val), "select": len(select)},
        "banking77_val": len(banking_val),
        "mrpc_val": len(mrpc_val[: sizes.mrpc_val or None]),
        "stsb_dev": len(sts[: sizes.stsb_dev or None]),
    }
    report["held_out_claim_ids"] = {"val": [c["_id"] for c in val], "select": [c["_id"] for c in select]}
    write_atomically(out / "prepare_report.json", json.dumps(report, indent=1) + "\n")
    return report


def _doc_text(doc: dict) -> str:
    """The abstract as evaluation sees it (MTEB's `title + " " + text`), so training and scoring agree."""
    return (doc.get("title", "") + " " + doc["text"]).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="the public data folder (scifact/, stsbenchmark/, ...)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--quick", action="store_true", help="CI-sized slices")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        report = prepare(Path(args.data), Path(args.out), QUICK if args.quick else FULL, args.seed)
    except ValueError as err:
        print(f"prepare: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report["counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
