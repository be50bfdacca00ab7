"""recipes/public/prepare.py: validation slices never reach training, and Banking77's shared intent names are
handled by the duplicate mask that the recipe's fine-tuning config turns on."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gemb_dist.batch import text_keys
from gemb_dist.config import load_config
from gemb_dist.loss import contrastive_loss

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "public"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_projection_init import public_data  # noqa: E402


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = public_data()
    if root is None:
        pytest.skip("the public data folder is not on this machine; set GEMB_PUBLIC_DATA")
    out = tmp_path_factory.mktemp("prepared")
    subprocess.run([sys.executable, str(RECIPE / "prepare.py"), "--data", str(root), "--out", str(out), "--quick"],
                   check=True, capture_output=True, text=True)  # fmt: skip
    return out


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def relevant_ids(beir: Path) -> set[str]:
    with open(beir / "qrels/test.tsv") as f:
        return {row["corpus-id"] for row in csv.DictReader(f, delimiter="\t")}


def test_held_out_slices_are_not_trained_on(prepared):
    train = jsonl(prepared / "source/finetune.jsonl") + jsonl(prepared / "source/prefinetune.jsonl")
    queries = {s["query"] for s in train}
    texts = queries | {s["positive"] for s in train}
    for beir in (prepared / "val/scifact", prepared / "select/scifact"):
        claims = [q["text"] for q in jsonl(beir / "queries.jsonl")]
        assert claims and not set(claims) & queries, beir
        docs = jsonl(beir / "corpus.jsonl")
        assert {d["_id"] for d in docs} >= relevant_ids(beir)
        # No abstract of a held-out corpus (relevant or distractor) is pre-finetuned on, fine-tuned on, or mined
        # from: the splits follow the claim-abstract graph's components.
        doc_texts = {d["text"] for d in docs} | {(d["title"] + " " + d["text"]).strip() for d in docs}
        assert not doc_texts & texts, beir
        mining = {d["text"] for d in jsonl(prepared / "source/scifact_corpus.jsonl")}
        assert not doc_texts & mining, beir
    val_ids = {d["_id"] for d in jsonl(prepared / "val/scifact/corpus.jsonl")}
    assert not val_ids & {d["_id"] for d in jsonl(prepared / "select/scifact/corpus.jsonl")}
    for folder in ("val", "select"):
        for name in ("banking77_train.csv", "banking77_test.csv"):
            with open(prepared / folder / name) as f:
                assert not {row["text"] for row in csv.DictReader(f)} & queries
    assert {s["task"] for s in train} == {"scifact", "mrpc", "banking77"}
    # STS-B is the task held out of training: none of its dev sentences is a training text (MRPC train shares some
    # news sentences with STS-B dev; those pairs are dropped). MRPC's validation and selection pairs neither.
    for path in (prepared / "val/stsb_dev.csv", prepared / "val/mrpc_val.csv", prepared / "select/mrpc.csv"):
        with open(path) as f:
            sentences = {t for row in csv.DictReader(f) for t in (row["sentence1"], row["sentence2"])}
        assert sentences and not sentences & texts, path
    report = json.loads((prepared / "prepare_report.json").read_text())
    overlaps = {**report["scifact"]["overlap"], **report["pairs"]["overlap"]}
    assert overlaps and set(overlaps.values()) == {0}, overlaps


def test_claims_that_share_an_abstract_stay_in_one_split():
    sys.path.insert(0, str(RECIPE))
    from prepare import claim_components

    claims = [{"_id": str(i), "text": f"claim {i}"} for i in range(5)] + [{"_id": "5", "text": "claim 0"}]
    qrels = {"0": ["a"], "1": ["a", "b"], "2": ["b"], "3": ["c"], "4": ["d"], "5": ["e"]}
    groups = [sorted(c["_id"] for c in g) for g in claim_components(claims, qrels)]
    assert groups == [["0", "1", "2", "5"], ["3"], ["4"]]  # 5 joins 0 through its identical text


def test_banking77_duplicate_intents_are_masked(prepared):
    config = load_config(RECIPE / "finetune.yaml", [f"data.shards={prepared}", "train.init_from=x"])
    assert config.loss.mask_duplicates
    banking = [s for s in jsonl(prepared / "source/finetune.jsonl") if s["task"] == "banking77"]
    positives = [s["positive"] for s in banking]
    assert len(set(positives)) < len(positives), "the slice should repeat an intent name"
    torch.manual_seed(0)
    n = len(banking)
    q_BD, pos_BD = torch.randn(n, 8), torch.randn(n, 8)
    q_keys = text_keys([f"banking77\x00{s['query']}" for s in banking])  # as the collator builds them
    kwargs = {"temperature": config.loss.temperature, "mrl_dims": [8]}
    masked = contrastive_loss(q_BD, pos_BD, q_keys=q_keys, pos_keys=text_keys(positives), **kwargs).loss
    unmasked = contrastive_loss(q_BD, pos_BD, **kwargs).loss
    # Naive reference: the same intent name elsewhere in the batch is not a negative.
    sim_BB = F.normalize(q_BD, dim=-1) @ F.normalize(pos_BD, dim=-1).T / config.loss.temperature
    same_BB = torch.tensor([[a == b for b in positives] for a in positives]) & ~torch.eye(n, dtype=torch.bool)
    reference = F.cross_entropy(sim_BB.masked_fill(same_BB, float("-inf")), torch.arange(n))
    torch.testing.assert_close(masked, reference)
    assert not torch.allclose(masked, unmasked)
