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


def test_held_out_slices_are_not_trained_on(prepared):
    train = jsonl(prepared / "source/finetune.jsonl") + jsonl(prepared / "source/prefinetune.jsonl")
    queries = {s["query"] for s in train}
    texts = queries | {s["positive"] for s in train}
    for split in ("scifact", "scifact_select"):
        claims = [q["text"] for q in jsonl(prepared / "val" / split / "queries.jsonl")]
        assert claims and not set(claims) & queries, split
    relevant = set()
    for split in ("scifact", "scifact_select"):
        with open(prepared / "val" / split / "qrels/test.tsv") as f:
            relevant |= {row["corpus-id"] for row in csv.DictReader(f, delimiter="\t")}
    corpus = {d["_id"]: d for d in jsonl(prepared / "val/scifact/corpus.jsonl")}
    corpus |= {d["_id"]: d for d in jsonl(prepared / "val/scifact_select/corpus.jsonl")}
    # The held-out claims' abstracts are not pre-finetuned on. A train claim may cite the same abstract as a
    # held-out claim (as in SciFact's own train/test split, whose claims share one corpus), so fine-tuning may see it.
    pretrain_texts = {s["positive"] for s in jsonl(prepared / "source/prefinetune.jsonl")}
    assert relevant and not {corpus[d]["text"] for d in relevant} & pretrain_texts
    for name in ("banking77_train.csv", "banking77_test.csv"):
        with open(prepared / "val" / name) as f:
            assert not {row["text"] for row in csv.DictReader(f)} & queries
    assert {s["task"] for s in train} == {"scifact", "mrpc", "banking77"}
    # STS-B is the task held out of training: none of its dev sentences is a training text.
    with open(prepared / "val/stsb_dev.csv") as f:
        sts = {t for row in csv.DictReader(f) for t in (row["sentence1"], row["sentence2"])}
    assert not sts & texts


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
