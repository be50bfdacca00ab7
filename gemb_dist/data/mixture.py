"""Checks of a run's task mixture against its data manifest, made on the driver before any worker starts.

Fine-tuning draws every global batch from one task, so a task whose samples cannot fill one global batch
would silently never be trained on, and a weight naming a task the shards do not hold is a typo.
"""

from __future__ import annotations

from gemb_dist.config import DataConfig
from gemb_dist.data.manifest import Manifest


def check_mixture(data: DataConfig, manifest: Manifest, source: str) -> None:
    """Raise ValueError naming the field when the mixture cannot train as configured on `manifest`."""
    tasks = manifest.tasks
    batch = data.global_batch_size
    if data.mode == "prefinetune":
        if manifest.num_samples < batch:
            raise ValueError(
                f"data.global_batch_size ({batch}) is larger than the dataset ({manifest.num_samples} samples in "
                f"{source}): not one optimizer step could be made"
            )
        return
    weights = data.task_weights if data.task_weights is not None else {t: float(n) for t, n in tasks.items()}
    for task in weights:
        if task not in tasks:
            raise ValueError(
                f"data.task_weights[{task!r}]: no shards of task {task!r} in {source} (its tasks: {sorted(tasks)})"
            )
    for task, weight in weights.items():
        if weight > 0 and tasks[task] < batch:
            raise ValueError(
                f"data.task_weights[{task!r}]: task {task!r} has {tasks[task]} samples in {source}, fewer than one "
                f"global batch (data.global_batch_size={batch}); give it weight 0 or a smaller batch"
            )
