"""Evaluation of embedding models on MTEB-style tasks at every Matryoshka (MRL) dim."""

# What each task reports (per dim) in `gemb eval` results; the first is its main score.
TASK_METRICS = {
    "sts": ("spearman", "pearson"),
    "retrieval": ("ndcg_at_10", "map_at_10", "recall_at_100"),
    "classification": ("accuracy", "accuracy_std"),
    "clustering": ("v_measure", "v_measure_std"),
    "pairs": ("ap",),
}
