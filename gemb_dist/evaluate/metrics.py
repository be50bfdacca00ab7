"""MTEB's task metrics as pure functions of embeddings, scores and labels (no model, no files).

Definitions follow MTEB so numbers compare with published scores: retrieval metrics use trec_eval semantics
(as computed by pytrec_eval), classification is MTEB's few-shot logistic-regression protocol, clustering is the
V-measure of mini-batch k-means, pair classification is the average precision of cosine similarities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.cluster import MiniBatchKMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, v_measure_score

Qrels = Mapping[str, Mapping[str, int]]  # query id -> doc id -> graded relevance
Run = Mapping[str, Sequence[tuple[str, float]]]  # query id -> (doc id, score), best first


def normalize_rows(emb_ND: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms_N1 = np.linalg.norm(emb_ND, axis=1, keepdims=True)
    return emb_ND / np.maximum(norms_N1, 1e-12)


def mrl_prefix(emb_ND: np.ndarray, dim: int) -> np.ndarray:
    """The Matryoshka embedding of size `dim`: the first `dim` coordinates, renormalised."""
    if not 1 <= dim <= emb_ND.shape[1]:
        raise ValueError(f"dim {dim} is outside [1, {emb_ND.shape[1]}] (the model's embedding size)")
    return normalize_rows(emb_ND[:, :dim])


def paired_cosine(a_ND: np.ndarray, b_ND: np.ndarray) -> np.ndarray:
    return np.sum(normalize_rows(a_ND) * normalize_rows(b_ND), axis=1)


# ---------------------------------------------------------------------------------------------- STS
def sts_scores(a_ND: np.ndarray, b_ND: np.ndarray, gold_N: Sequence[float]) -> dict[str, float]:
    """Spearman (MTEB's main STS score) and Pearson correlation of pair cosine similarity with the gold score."""
    cosine_N = paired_cosine(a_ND, b_ND)
    return {"spearman": float(spearmanr(cosine_N, gold_N).statistic), "pearson": float(pearsonr(cosine_N, gold_N)[0])}


# ---------------------------------------------------------------------------------------------- retrieval
def rank_documents(
    scores_QN: np.ndarray,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    top_k: int,
    ignore_identical_ids: bool = True,
) -> dict[str, list[tuple[str, float]]]:
    """Top `top_k` documents per query by score; a document whose id equals the query id is dropped (MTEB)."""
    ranked: dict[str, list[tuple[str, float]]] = {}
    keep = min(top_k + 1, len(doc_ids))  # one spare in case the query's own id is among the best
    for q, qid in enumerate(query_ids):
        row_N = scores_QN[q]
        best = np.argpartition(-row_N, keep - 1)[:keep] if keep < len(doc_ids) else np.arange(len(doc_ids))
        pairs = [(doc_ids[d], float(row_N[d])) for d in best if not (ignore_identical_ids and doc_ids[d] == qid)]
        ranked[qid] = _trec_order(pairs)[:top_k]
    return ranked


def _trec_order(pairs: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """trec_eval's order: score descending, ties broken by document id descending."""
    return sorted(pairs, key=lambda p: (p[1], p[0]), reverse=True)


def _evaluated(run: Run, qrels: Qrels) -> list[str]:
    # trec_eval (and so pytrec_eval and MTEB) averages over queries present in both the run and the qrels.
    return [q for q in run if q in qrels]


def ndcg_at_k(run: Run, qrels: Qrels, k: int) -> float:
    """Mean nDCG@k: gain = graded relevance, discount log2(rank + 1), ideal DCG from the query's qrels."""
    values = []
    for qid in _evaluated(run, qrels):
        gains = [max(qrels[qid].get(doc, 0), 0) for doc, _ in _trec_order(list(run[qid]))[:k]]
        dcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(gains))
        ideal = sorted((max(r, 0) for r in qrels[qid].values()), reverse=True)[:k]
        idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
        values.append(dcg / idcg if idcg > 0 else 0.0)
    return float(np.mean(values)) if values else 0.0


def map_at_k(run: Run, qrels: Qrels, k: int) -> float:
    """Mean of AP@k = (sum of precision@i over relevant hits i <= k) / (number of relevant docs in the qrels)."""
    values = []
    for qid in _evaluated(run, qrels):
        num_relevant = sum(1 for r in qrels[qid].values() if r > 0)
        hits, precision_sum = 0, 0.0
        for rank, (doc, _) in enumerate(_trec_order(list(run[qid]))[:k], start=1):
            if qrels[qid].get(doc, 0) > 0:
                hits += 1
                precision_sum += hits / rank
        values.append(precision_sum / num_relevant if num_relevant else 0.0)
    return float(np.mean(values)) if values else 0.0


def recall_at_k(run: Run, qrels: Qrels, k: int) -> float:
    """Mean fraction of a query's relevant docs found in its top k."""
    values = []
    for qid in _evaluated(run, qrels):
        relevant = {d for d, r in qrels[qid].items() if r > 0}
        found = sum(1 for doc, _ in _trec_order(list(run[qid]))[:k] if doc in relevant)
        values.append(found / len(relevant) if relevant else 0.0)
    return float(np.mean(values)) if values else 0.0


def retrieval_scores(run: Run, qrels: Qrels) -> dict[str, float]:
    return {
        "ndcg_at_10": ndcg_at_k(run, qrels, 10),
        "map_at_10": map_at_k(run, qrels, 10),
        "recall_at_100": recall_at_k(run, qrels, 100),
    }


# ---------------------------------------------------------------------------------------------- classification
def undersample_indices(labels: Sequence, samples_per_label: int, num_experiments: int, seed: int) -> list[list[int]]:
    """MTEB's training subsets: before each experiment the index list is shuffled again by a fresh
    `RandomState(seed)` (so successive experiments differ), then the first `samples_per_label` of each label kept."""
    order = list(range(len(labels)))
    subsets = []
    for _ in range(num_experiments):
        np.random.RandomState(seed).shuffle(order)
        counts: dict = {}
        chosen = []
        for i in order:
            if counts.get(labels[i], 0) < samples_per_label:
                chosen.append(i)
                counts[labels[i]] = counts.get(labels[i], 0) + 1
        subsets.append(chosen)
    return subsets


def classification_scores(
    train_ND: np.ndarray,
    train_labels: Sequence,
    test_MD: np.ndarray,
    test_labels: Sequence,
    subsets: Sequence[Sequence[int]],
) -> dict[str, float]:
    """Accuracy on the full test set of LogisticRegression(max_iter=100) fit on each training subset;
    mean and standard deviation over the subsets (experiments)."""
    accuracies = []
    test_labels = np.asarray(test_labels)
    for subset in subsets:
        classifier = LogisticRegression(max_iter=100)
        classifier.fit(train_ND[list(subset)], np.asarray(train_labels)[list(subset)])
        accuracies.append(float(np.mean(classifier.predict(test_MD) == test_labels)))
    return {"accuracy": float(np.mean(accuracies)), "accuracy_std": float(np.std(accuracies))}


# ---------------------------------------------------------------------------------------------- clustering
def v_measure(labels_true: Sequence, labels_pred: Sequence) -> float:
    return float(v_measure_score(labels_true, labels_pred))


def clustering_scores(
    emb_ND: np.ndarray, labels: Sequence, seeds: Sequence[int] = tuple(range(10))
) -> dict[str, float]:
    """V-measure of MiniBatchKMeans (k = number of labels, batch 512, one init) averaged over `seeds`."""
    num_clusters = len(set(labels))
    values = []
    for seed in seeds:
        kmeans = MiniBatchKMeans(n_clusters=num_clusters, batch_size=512, n_init=1, random_state=seed)
        values.append(v_measure(labels, kmeans.fit_predict(emb_ND)))
    return {"v_measure": float(np.mean(values)), "v_measure_std": float(np.std(values))}


# ---------------------------------------------------------------------------------------------- pairs
def pair_scores(a_ND: np.ndarray, b_ND: np.ndarray, labels_N: Sequence[int]) -> dict[str, float]:
    """Average precision of the pair cosine similarity as a score for label 1 (the area under the
    precision-recall curve over all cosine thresholds, MTEB's main pair-classification score)."""
    return {"ap": float(average_precision_score(np.asarray(labels_N), paired_cosine(a_ND, b_ND)))}
