"""Turn the public training splits (SciFact, STS Benchmark, MRPC, Banking77) into the recipe's training jsonl and
validation sets, with every validation and selection slice held out of all training.

    python recipes/public/prepare.py --data /path/to/public --out recipe_out/public [--quick]

Writes under `--out`:
- `source/prefinetune.jsonl`: SciFact (title -> abstract) pairs of every abstract not held out, task `scifact`.
- `source/finetune.jsonl`: (query, positive) pairs for mining, one task each: `scifact` (train claim -> a cited
  abstract), `mrpc` (paraphrase pairs, Quality 1), `banking77` (utterance -> its intent's name, e.g.
  "card arrival"; the other intent names become its negatives when mined).
- `source/scifact_corpus.jsonl`: every abstract not held out (`{"text": title + " " + abstract}`): the corpus SciFact
  negatives are mined from (the mining job's per-task extra corpus).
- `val/scifact/`: BEIR dir (`corpus.jsonl`, `queries.jsonl`, `qrels/test.tsv`) of held-out claims against their
  relevant abstracts plus random distractors; `val/stsb_dev.csv` (STS-B dev; STS-B is the task held out of training
  entirely), `val/mrpc_val.csv` (MRPC's validation file), `val/banking77_{train,test}.csv` (a held-out Banking77
  slice for the classification probe). These make the table.
- `select/`: the same kinds of slices for the greedy soup only (`scifact/`, `mrpc.csv` carved out of MRPC train,
  `banking77_{train,test}.csv`), disjoint from the validation slices and from training.
- `prepare_report.json`: the counts, seed, held-out ids and the overlap counts between every pair of sets.

Claims are split by connected components of the claim-abstract graph (claims citing a common abstract, or sharing
a text, stay together), so no held-out claim's abstract is a fine-tuning positive. Distractors are abstracts no
claim cites, and every held-out abstract is kept out of pre-finetuning and mining. Splits are seeded (`--seed`) and
depend only on the input files.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steps import write_atomically  # noqa: E402  (recipes/public is a folder of scripts, not a package)


@dataclass(frozen=True)
class Sizes:
    """How much of each source goes where (0 = all that is left); `--quick` shrinks everything to CI size."""

    val_claims: int  # SciFact train claims held out for the table (whole components, so a few more)
    select_claims: int  # ... and for the greedy soup's selection score
    val_distractors: int  # uncited abstracts in the validation corpus beside the relevant ones
    select_distractors: int
    prefinetune_pairs: int
    mrpc_pairs: int  # MRPC train paraphrase pairs for fine-tuning
    mrpc_select: int  # MRPC train rows (both labels) held out for selection
    banking_train: int  # Banking77 utterances used for fine-tuning
    banking_val: int  # ... held out, half as the probe's train side, half as its test side
    banking_select: int
    stsb_dev: int
    mrpc_val: int
    train_claims: int = 0  # SciFact train claims for fine-tuning
    mining_corpus: int = 0  # abstracts SciFact negatives are mined from (the train claims' own always among them)


FULL = Sizes(120, 90, 1100, 800, 0, 1280, 400, 1600, 1000, 600, 0, 0)
QUICK = Sizes(16, 16, 48, 32, 64, 48, 60, 48, 160, 160, 200, 120, train_claims=48, mining_corpus=200)


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


def doc_text(doc: dict) -> str:
    """The abstract as evaluation sees it (MTEB's `title + " " + text`), so training and scoring agree."""
    return (doc.get("title", "") + " " + doc["text"]).strip()


def claim_components(claims: list[dict], qrels: dict[str, list[str]]) -> list[list[dict]]:
    """Claims grouped by connected components of the graph linking a claim to the abstracts it cites and to
    claims of the same text; components in a fixed order (their smallest claim id)."""
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for claim in claims:
        for node in [f"d:{d}" for d in qrels[claim["_id"]]] + [f"t:{claim['text']}"]:
            parent[find(f"q:{claim['_id']}")] = find(node)
    groups: dict[str, list[dict]] = {}
    for claim in claims:
        groups.setdefault(find(f"q:{claim['_id']}"), []).append(claim)
    return sorted(groups.values(), key=lambda g: min(c["_id"] for c in g))


def take_components(components: list[list[dict]], num_claims: int) -> tuple[list[dict], list[list[dict]]]:
    """Whole components from the front until at least `num_claims` claims; returns (claims, the rest)."""
    taken: list[dict] = []
    while components and len(taken) < num_claims:
        taken += components.pop(0)
    return taken, components


def beir_slice(out: Path, claims: list[dict], qrels: dict, corpus: dict, distractors: list[str]) -> list[str]:
    """A BEIR dir for `claims`: their relevant abstracts plus `distractors` as the corpus. Returns its doc ids."""
    doc_ids = sorted({d for c in claims for d in qrels[c["_id"]]} | set(distractors))
    write_lines(out / "corpus.jsonl", [json.dumps(corpus[d]) for d in doc_ids])
    write_lines(out / "queries.jsonl", [json.dumps({"_id": c["_id"], "text": c["text"]}) for c in claims])
    rows = ["query-id\tcorpus-id\tscore"] + [f"{c['_id']}\t{d}\t1" for c in claims for d in qrels[c["_id"]]]
    write_lines(out / "qrels" / "test.tsv", rows)
    return doc_ids


def write_lines(path: Path, lines: list[str]) -> None:
    write_atomically(path, "".join(line + "\n" for line in lines))


def write_csv(path: Path, header: list[str], rows: list) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_atomically(path, buffer.getvalue())


def split_scifact(data: Path, out: Path, sizes: Sizes, rng: random.Random, report: dict) -> list[dict]:
    """The SciFact slices, pre-finetuning pairs and mining corpus; returns the fine-tuning samples."""
    corpus = {d["_id"]: d for d in read_jsonl(data / "scifact" / "corpus.jsonl")}
    qrels = read_qrels(data / "scifact" / "qrels" / "train.tsv")
    unknown = sorted({d for ds in qrels.values() for d in ds} - set(corpus))
    if unknown:
        raise ValueError(f"{data / 'scifact/qrels/train.tsv'}: corpus-ids not in corpus.jsonl: {unknown[:5]}")
    claims = [q for q in read_jsonl(data / "scifact" / "queries.jsonl") if qrels.get(q["_id"])]
    components = claim_components(claims, qrels)
    rng.shuffle(components)
    val, components = take_components(components, sizes.val_claims)
    select, components = take_components(components, sizes.select_claims)
    train_claims = [c for group in components for c in group][: sizes.train_claims or None]
    cited = {d for ds in qrels.values() for d in ds}
    uncited = sorted(set(corpus) - cited)
    rng.shuffle(uncited)
    num_val, num_select = sizes.val_distractors, sizes.select_distractors
    val_docs = beir_slice(out / "val/scifact", val, qrels, corpus, uncited[:num_val])
    select_docs = beir_slice(out / "select/scifact", select, qrels, corpus, uncited[num_val : num_val + num_select])
    held_out = set(val_docs) | set(select_docs)
    # Everything else is training material: the pre-finetuning pairs and the corpus SciFact negatives come from.
    kept = [d for d in sorted(corpus) if d not in held_out]
    train_docs = {d for c in train_claims for d in qrels[c["_id"]]}
    others = [d for d in kept if d not in train_docs]
    mining = sorted(train_docs | set(rng.sample(others, min(len(others), sizes.mining_corpus or len(others)))))
    write_lines(out / "source/scifact_corpus.jsonl", [json.dumps({"text": doc_text(corpus[d])}) for d in mining])
    pft_ids = [d for d in kept if corpus[d]["title"].strip() and corpus[d]["text"].strip()]
    rng.shuffle(pft_ids)
    pft_ids = pft_ids[: sizes.prefinetune_pairs or None]
    pft = [{"task": "scifact", "query": corpus[d]["title"], "positive": corpus[d]["text"]} for d in pft_ids]
    write_lines(out / "source/prefinetune.jsonl", [json.dumps(s) for s in pft])
    finetune = [
        {"task": "scifact", "query": c["text"], "positive": doc_text(corpus[d])}
        for c in train_claims
        for d in qrels[c["_id"]]
    ]
    val_relevant = {d for c in val for d in qrels[c["_id"]]}
    select_relevant = {d for c in select for d in qrels[c["_id"]]}
    report["scifact"] = {
        "claims": {"train": len(train_claims), "val": len(val), "select": len(select)},
        "corpus": {"val": len(val_docs), "select": len(select_docs), "mining": len(mining)},
        "relevant": {"val": len(val_relevant), "select": len(select_relevant)},
        "prefinetune_pairs": len(pft),
        "overlap": {
            "val_relevant & finetune_positives": len(val_relevant & train_docs),
            "select_relevant & finetune_positives": len(select_relevant & train_docs),
            "val_corpus & prefinetune": len(set(val_docs) & set(pft_ids)),
            "select_corpus & prefinetune": len(set(select_docs) & set(pft_ids)),
            "val_corpus & mining_corpus": len(set(val_docs) & set(mining)),
            "select_corpus & mining_corpus": len(set(select_docs) & set(mining)),
            "val_corpus & select_corpus": len(set(val_docs) & set(select_docs)),
            "val_claims & train_claims (text)": len({c["text"] for c in val} & {c["text"] for c in train_claims}),
        },
    }
    report["held_out_claim_ids"] = {"val": [c["_id"] for c in val], "select": [c["_id"] for c in select]}
    return finetune


def split_pairs(data: Path, out: Path, sizes: Sizes, rng: random.Random, report: dict) -> list[dict]:
    """MRPC and Banking77 fine-tuning samples and their validation and selection slices; STS-B dev."""
    sts = read_sts(data / "stsbenchmark/sts-dev.csv")[: sizes.stsb_dev or None]
    write_csv(out / "val/stsb_dev.csv", ["sentence1", "sentence2", "score"], sts)
    mrpc_val = [(a, b, q) for q, a, b in read_mrpc(data / "mrpc/msr-para-val.tsv")][: sizes.mrpc_val or None]
    write_csv(out / "val/mrpc_val.csv", ["sentence1", "sentence2", "label"], mrpc_val)
    # MRPC and STS-B share news sentences: a train pair with a sentence of either validation set is dropped, so the
    # held-out task (STS-B) and MRPC's validation pairs are never embedded in training.
    val_sentences = {s for a, b, _ in sts for s in (a, b)} | {s for a, b, _ in mrpc_val for s in (a, b)}
    mrpc_rows = read_mrpc(data / "mrpc/msr-para-train.tsv")
    clean = [(q, a, b) for q, a, b in mrpc_rows if a not in val_sentences and b not in val_sentences]
    rng.shuffle(clean)
    select_rows, train_rows = clean[: sizes.mrpc_select], clean[sizes.mrpc_select :]
    select_sentences = {s for _, a, b in select_rows for s in (a, b)}
    write_csv(out / "select/mrpc.csv", ["sentence1", "sentence2", "label"], [(a, b, q) for q, a, b in select_rows])
    paraphrases = [(a, b) for q, a, b in train_rows if q == 1 and not {a, b} & select_sentences]
    finetune = []
    # One direction per pair, chosen at random: both directions in one batch would put a query's own text among
    # its in-batch documents (a false negative scoring 1), which the duplicate mask cannot see.
    for a, b in paraphrases[: sizes.mrpc_pairs or None]:
        query, positive = (a, b) if rng.random() < 0.5 else (b, a)
        finetune.append({"task": "mrpc", "query": query, "positive": positive})
    banking = read_banking(data / "banking77/train.csv")
    rng.shuffle(banking)
    val_rows, rest = banking[: sizes.banking_val], banking[sizes.banking_val :]
    select_banking, rest = rest[: sizes.banking_select], rest[sizes.banking_select :]
    for name, rows in (("val/banking77", val_rows), ("select/banking77", select_banking)):
        half = len(rows) // 2
        write_csv(out / f"{name}_train.csv", ["text", "label"], rows[:half])
        write_csv(out / f"{name}_test.csv", ["text", "label"], rows[half:])
    for text, category in rest[: sizes.banking_train or None]:
        finetune.append({"task": "banking77", "query": text, "positive": intent_name(category)})
    texts = {t for s in finetune for t in (s["query"], s["positive"])}
    report["pairs"] = {
        "stsb_dev": len(sts),
        "mrpc": {"val": len(mrpc_val), "select": len(select_rows), "train_rows_dropped": len(mrpc_rows) - len(clean)},
        "banking77": {"val": len(val_rows), "select": len(select_banking)},
        "overlap": {
            "stsb_dev & finetune texts": len({s for a, b, _ in sts for s in (a, b)} & texts),
            "mrpc_val & finetune texts": len({s for a, b, _ in mrpc_val for s in (a, b)} & texts),
            "mrpc_select & finetune texts": len(select_sentences & texts),
            "banking77 val+select & finetune texts": len({t for t, _ in val_rows + select_banking} & texts),
        },
    }
    return finetune


def prepare(data: Path, out: Path, sizes: Sizes, seed: int) -> dict:
    rng = random.Random(seed)
    report: dict = {"seed": seed, "sizes": asdict(sizes)}
    finetune = split_scifact(data, out, sizes, rng, report)
    finetune += split_pairs(data, out, sizes, rng, report)
    write_lines(out / "source/finetune.jsonl", [json.dumps(s) for s in finetune])
    report["finetune"] = {t: sum(s["task"] == t for s in finetune) for t in ("scifact", "mrpc", "banking77")}
    write_atomically(out / "prepare_report.json", json.dumps(report, indent=1) + "\n")
    return report


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
    print(json.dumps({k: report[k] for k in ("finetune", "scifact", "pairs")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
