"""Run a gemb-dist encoder under the `mteb` package (2.x), for users who have MTEB's data.

    import mteb
    from gemb_dist.evaluate.encoders import load_encoder
    from gemb_dist.evaluate.mteb_adapter import MtebEncoder
    model = MtebEncoder(load_encoder("runs/soup"), dim=768)
    mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark"]))

mteb 2.x calls `encode(inputs: DataLoader, *, task_metadata, hf_split, hf_subset, prompt_type, **kwargs)` with
batches of `{"text": [...]}`; queries (prompt_type "query") get the prompt of the task's type (e.g. retrieval,
sts), matching the task names `gemb eval` uses, documents none. `dim` keeps the first `dim` coordinates
(Matryoshka) and renormalises, so cosine similarity equals the one `gemb eval` scores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from gemb_dist.evaluate.encoders import Encoder
from gemb_dist.evaluate.metrics import mrl_prefix

# mteb task types -> the task names of gemb prompts and of `gemb eval`.
TASK_TYPE_TO_TASK = {
    "sts": "sts",
    "retrieval": "retrieval",
    "reranking": "retrieval",
    "instructionretrieval": "retrieval",
    "classification": "classification",
    "multilabelclassification": "classification",
    "clustering": "clustering",
    "pairclassification": "pairs",
}


class MtebEncoder(AbsEncoder):
    """mteb's `EncoderProtocol` over any `gemb_dist.evaluate.encoders.Encoder`."""

    def __init__(self, encoder: Encoder, dim: int | None = None, name: str | None = None):
        self.model = encoder
        self.dim = dim or encoder.dim
        if not 1 <= self.dim <= encoder.dim:
            raise ValueError(f"dim {self.dim} is outside [1, {encoder.dim}] for {encoder.name}")
        self.mteb_model_meta = ModelMeta.create_empty(
            {
                "name": name or f"gemb-dist/{encoder.name.rstrip('/').split('/')[-1]}-d{self.dim}",
                "revision": "local",
                "embed_dim": self.dim,
                "similarity_fn_name": ScoringFunction.COSINE,
                "framework": ["PyTorch"],
            }
        )

    def encode(
        self,
        inputs,
        *,
        task_metadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        task_type = str(task_metadata.type).lower().replace("-", "").replace("_", "")
        task = TASK_TYPE_TO_TASK.get(task_type, task_type)
        # Symmetric tasks have no prompt type; like `gemb eval`, they treat every text as a query of the task.
        is_query = prompt_type != PromptType.document
        emb_ND = self.model.encode(texts, is_query=is_query, task=task)
        return mrl_prefix(np.asarray(emb_ND, dtype=np.float32), self.dim)
