"""Each evaluation metric against a small case whose expected value is worked out by hand in the test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gemb_dist.evaluate import metrics

DOCS = ["d1", "d2", "d3", "d4", "d5"]
# Three queries; the third has the id "d4", the id of a document that must be ignored for it (MTEB).
QUERY_IDS = ["q1", "q2", "d4"]
SCORES_QN = np.array(
    [
        [0.8, 0.7, 0.9, 0.6, 0.5],  # q1 ranking: d3 d1 d2 d4 d5
        [0.9, 0.8, 0.6, 0.7, 0.1],  # q2 ranking: d1 d2 d4 d3 d5
        [0.7, 0.8, 0.6, 0.99, 0.9],  # "d4" ranking: (d4 dropped) d5 d2 d1 d3
    ]
)
QRELS = {"q1": {"d1": 2, "d3": 1, "d4": 0}, "q2": {"d2": 1, "d5": 3}, "d4": {"d2": 1}}


def _unit(cosines: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of 2-d vectors whose cosine similarities are `cosines` (a is scaled to check renormalisation)."""
    a = np.tile([3.0, 0.0], (len(cosines), 1))
    b = np.array([[c, math.sqrt(1 - c * c)] for c in cosines])
    return a, b


@pytest.fixture
def run():
    return metrics.rank_documents(SCORES_QN, QUERY_IDS, DOCS, top_k=100)


def test_ranking_drops_the_query_own_id_and_orders_by_score(run):
    assert [d for d, _ in run["q1"]] == ["d3", "d1", "d2", "d4", "d5"]
    assert [d for d, _ in run["q2"]] == ["d1", "d2", "d4", "d3", "d5"]
    assert [d for d, _ in run["d4"]] == ["d5", "d2", "d1", "d3"]
    top2 = metrics.rank_documents(SCORES_QN, QUERY_IDS, DOCS, top_k=2)
    assert [d for d, _ in top2["d4"]] == ["d5", "d2"]  # still 2 after dropping d4


def test_ndcg_at_10_by_hand(run):
    # q1: gains by rank 1 (d3), 2 (d1); ideal 2, 1.
    q1 = (1 / math.log2(2) + 2 / math.log2(3)) / (2 / math.log2(2) + 1 / math.log2(3))
    # q2: d2 (gain 1) at rank 2, d5 (gain 3) at rank 5; ideal 3, 1.
    q2 = (1 / math.log2(3) + 3 / math.log2(6)) / (3 / math.log2(2) + 1 / math.log2(3))
    # "d4": d2 (gain 1) at rank 2 once its own id is dropped; ideal 1.
    q3 = (1 / math.log2(3)) / 1
    assert metrics.ndcg_at_k(run, QRELS, 10) == pytest.approx((q1 + q2 + q3) / 3, abs=1e-12)
    assert metrics.ndcg_at_k(run, QRELS, 10) == pytest.approx(0.6613, abs=1e-4)
    # At k=1 only q1 has a relevant first document: gain 1 of an ideal 2.
    assert metrics.ndcg_at_k(run, QRELS, 1) == pytest.approx((0.5 + 0 + 0) / 3, abs=1e-12)


def test_map_at_10_by_hand(run):
    # AP = sum of precision at each relevant hit / number of relevant docs in the qrels.
    q1 = (1 / 1 + 2 / 2) / 2
    q2 = (1 / 2 + 2 / 5) / 2
    q3 = (1 / 2) / 1
    assert metrics.map_at_k(run, QRELS, 10) == pytest.approx((q1 + q2 + q3) / 3, abs=1e-12)
    # Cut at 3: q2 finds only d2 (rank 2) but still divides by its 2 relevant docs.
    assert metrics.map_at_k(run, QRELS, 3) == pytest.approx((1.0 + (1 / 2) / 2 + 0.5) / 3, abs=1e-12)


def test_recall_at_k_by_hand(run):
    assert metrics.recall_at_k(run, QRELS, 100) == pytest.approx(1.0)
    # Top 3: q1 finds d3, d1 (2/2); q2 finds d2 (1/2); "d4" finds d2 (1/1).
    assert metrics.recall_at_k(run, QRELS, 3) == pytest.approx((1 + 0.5 + 1) / 3, abs=1e-12)
    scores = metrics.retrieval_scores(run, QRELS)
    assert set(scores) == {"ndcg_at_10", "map_at_10", "recall_at_100"}


def test_ties_follow_trec_eval_order_and_unjudged_queries_are_skipped():
    # Equal scores: trec_eval ranks the larger document id first.
    run = {"q": [("a", 0.5), ("b", 0.5)], "unjudged": [("a", 1.0)]}
    qrels = {"q": {"a": 1}}
    assert metrics.ndcg_at_k(run, qrels, 10) == pytest.approx(1 / math.log2(3))  # a at rank 2
    assert metrics.map_at_k(run, qrels, 10) == pytest.approx(0.5)


def test_spearman_and_pearson_by_hand():
    a, b = _unit([0.1, 0.2, 0.3, 0.4])
    gold = [1.0, 3.0, 2.0, 4.0]
    # Ranks 1,2,3,4 vs 1,3,2,4: sum d^2 = 2, rho = 1 - 6*2 / (4*(16-1)) = 0.8.
    # Pearson: centred x = (-.15,-.05,.05,.15), y = (-1.5,.5,-.5,1.5): 0.4 / sqrt(0.05 * 5) = 0.8.
    scores = metrics.sts_scores(a, b, gold)
    assert scores["spearman"] == pytest.approx(0.8, abs=1e-12)
    assert scores["pearson"] == pytest.approx(0.8, abs=1e-9)


def test_pair_average_precision_by_hand():
    a, b = _unit([0.9, 0.8, 0.7, 0.6])
    labels = [1, 0, 1, 0]
    # Thresholds high to low: (P=1, R=.5), (P=.5, R=.5), (P=2/3, R=1), ... AP = .5*1 + .5*(2/3).
    assert metrics.pair_scores(a, b, labels)["ap"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)


def test_v_measure_by_hand():
    true, pred = ["a", "a", "b", "b"], [0, 0, 0, 1]
    h_c = math.log(2)  # classes 2/4, 2/4
    h_k = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # clusters 3/4, 1/4
    h_c_given_k = -(2 / 4 * math.log(2 / 3) + 1 / 4 * math.log(1 / 3))  # cluster 0 = {a, a, b}; cluster 1 pure
    h_k_given_c = -(1 / 4 * math.log(1 / 2) + 1 / 4 * math.log(1 / 2))  # class b split over both clusters
    homogeneity, completeness = 1 - h_c_given_k / h_c, 1 - h_k_given_c / h_k
    expected = 2 * homogeneity * completeness / (homogeneity + completeness)
    assert metrics.v_measure(true, pred) == pytest.approx(expected, abs=1e-12)
    assert metrics.v_measure(true, pred) == pytest.approx(0.3437, abs=1e-4)


def test_clustering_of_separated_groups_is_perfect():
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    emb = np.concatenate([c + 0.01 * rng.standard_normal((5, 3)) for c in centres])
    labels = [lab for lab in "xyz" for _ in range(5)]
    scores = metrics.clustering_scores(emb, labels, seeds=[0, 1, 2])
    assert scores["v_measure"] == pytest.approx(1.0)


def test_classification_accuracy_mean_and_std():
    # 1-d separable data; the last test point is labelled against its side, so every experiment scores 3/4.
    train = np.array([[-1.0], [-1.2], [-0.8], [1.0], [1.2], [0.8]])
    train_labels = ["neg", "neg", "neg", "pos", "pos", "pos"]
    test = np.array([[-2.0], [2.0], [-0.5], [0.5]])
    test_labels = ["neg", "pos", "neg", "neg"]
    subsets = metrics.undersample_indices(train_labels, samples_per_label=2, num_experiments=3, seed=42)
    scores = metrics.classification_scores(train, train_labels, test, test_labels, subsets)
    assert scores == {"accuracy": 0.75, "accuracy_std": 0.0}


def test_undersampling_matches_mteb():
    """Same training subsets as mteb's own undersampling (the reference for comparable scores)."""
    datasets = pytest.importorskip("datasets")
    mteb_mocks = pytest.importorskip("mteb.mocks.mock_tasks")
    labels = [str(i % 3) for i in range(40)]
    task = mteb_mocks.MockClassificationTask()
    task.samples_per_label = 4
    dataset = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(40)], "label": labels})
    ours = metrics.undersample_indices(labels, samples_per_label=4, num_experiments=3, seed=task.seed)
    idxs = None
    for experiment in range(3):
        _, idxs, selected = task._undersample_data(dataset, experiment, idxs)
        assert ours[experiment] == selected
    assert ours[0] != ours[1]  # successive experiments draw different subsets
    assert all(sorted(labels[i] for i in s).count("0") == 4 for s in ours)


def test_mrl_prefix_renormalises_and_checks_dim():
    emb = np.array([[3.0, 4.0, 12.0]])
    np.testing.assert_allclose(metrics.mrl_prefix(emb, 2), [[0.6, 0.8]])
    with pytest.raises(ValueError, match="outside"):
        metrics.mrl_prefix(emb, 4)
