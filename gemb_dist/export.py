"""Export a gemb model for serving: the sentence-transformers layout or a plain Hugging Face directory.

`gemb export --model DIR --out DIR [--set format=hf] [--config FILE]` (ExportConfig)

- `sentence-transformers`: modules.json with Transformer (the backbone at the root), mean Pooling, Dense (the
  projection, identity activation) and Normalize; task prompts as sentence-transformers prompt prefixes; the
  MRL dims in `gemb_export.json` and the model card. Decoder backbones keep their attention direction through
  `is_causal` in config.json, which transformers >= 5.2 honours when sentence-transformers loads the backbone.
- `hf`: the backbone as a plain transformers model directory (config.json, model.safetensors, tokenizer) plus
  `projection.safetensors` (`weight` [D, H], `bias` [D]) and `gemb_config.json`; `EmbeddingModel.load` reads it.

Both are written to a temporary directory beside the target and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import save_file

from gemb_dist.config import Section
from gemb_dist.config_args import add_config_arguments, config_from_args
from gemb_dist.files import atomic_dir
from gemb_dist.model import PROJECTION_FILE, EmbeddingModel

FORMATS = ("sentence-transformers", "hf")
ALIASES = {"model": "model", "out": "out"}
EXPORT_INFO_FILE = "gemb_export.json"
# sentence-transformers' own prompt names: encode_query() uses "query", encode_document() uses "document".
QUERY_PROMPT, DOCUMENT_PROMPT = "query", "document"


def template_prefix(template: str, field: str) -> str:
    """The prefix of a `"<prefix>{text}"` template; sentence-transformers prompts can only be prefixes."""
    if template.count("{text}") != 1 or not template.endswith("{text}"):
        raise ValueError(
            f"{field} = {template!r} cannot be exported as a sentence-transformers prompt: only prefix templates "
            f"of the form '<prefix>{{text}}' are supported"
        )
    return template[: -len("{text}")]


def sentence_transformers_prompts(prompts: dict[str, str], default_prompt: str) -> dict[str, str]:
    """Task templates as sentence-transformers prompts: one per task, `query` (the default query template,
    used by `encode_query`) and an empty `document` prompt, since documents never get one."""
    if DOCUMENT_PROMPT in prompts:
        raise ValueError(
            f"model.prompts[{DOCUMENT_PROMPT!r}]: the task name {DOCUMENT_PROMPT!r} is reserved in the "
            "sentence-transformers export for the (empty) document prompt; rename the task"
        )
    exported = {task: template_prefix(t, f"model.prompts[{task!r}]") for task, t in prompts.items()}
    exported.setdefault(QUERY_PROMPT, template_prefix(default_prompt, "model.default_prompt"))
    exported[DOCUMENT_PROMPT] = ""
    return exported


def export_sentence_transformers(model: EmbeddingModel, path: str | os.PathLike) -> None:
    """Write `model` in the sentence-transformers layout at `path` (atomically).

    `SentenceTransformer(path, truncate_dim=d).encode(texts, normalize_embeddings=True)` equals
    `model.embed(texts, dim=d)`; without `normalize_embeddings` sentence-transformers truncates the unit-norm
    D-dim vector without renormalising (cosine similarity, its default similarity, is unaffected).
    """
    prompts = sentence_transformers_prompts(model.config.prompts, model.config.default_prompt)
    with atomic_dir(path) as out:
        _write_backbone(model, out)
        hidden, dim = model.projection.in_features, model.projection.out_features
        (out / "sentence_bert_config.json").write_text(
            _json({"max_seq_length": model.config.max_length, "do_lower_case": False})
        )
        (out / "1_Pooling").mkdir()
        (out / "1_Pooling" / "config.json").write_text(
            _json(
                {
                    "word_embedding_dimension": hidden,
                    "pooling_mode_cls_token": False,
                    "pooling_mode_mean_tokens": True,
                    "pooling_mode_max_tokens": False,
                    "pooling_mode_mean_sqrt_len_tokens": False,
                    "include_prompt": True,  # the prompt's tokens are part of the mean, as in training
                }
            )
        )
        (out / "2_Dense").mkdir()
        (out / "2_Dense" / "config.json").write_text(
            _json(
                {
                    "in_features": hidden,
                    "out_features": dim,
                    "bias": True,
                    "activation_function": "torch.nn.modules.linear.Identity",
                }
            )
        )
        save_file(_projection_tensors(model, "linear."), str(out / "2_Dense" / "model.safetensors"))
        (out / "3_Normalize").mkdir()
        modules = [
            ("", "sentence_transformers.models.Transformer"),
            ("1_Pooling", "sentence_transformers.models.Pooling"),
        ]
        modules += [
            ("2_Dense", "sentence_transformers.models.Dense"),
            ("3_Normalize", "sentence_transformers.models.Normalize"),
        ]
        (out / "modules.json").write_text(
            _json([{"idx": i, "name": str(i), "path": p, "type": t} for i, (p, t) in enumerate(modules)])
        )
        (out / "config_sentence_transformers.json").write_text(
            _json(
                {
                    "__version__": _versions(),
                    "prompts": prompts,
                    # A default prompt name would also prefix documents in encode(); queries get theirs
                    # through encode_query() ("query") or prompt_name=<task>.
                    "default_prompt_name": None,
                    "similarity_fn_name": "cosine",
                    "model_type": "SentenceTransformer",
                }
            )
        )
        _write_info(model, out, "sentence-transformers", prompts)


def export_hf(model: EmbeddingModel, path: str | os.PathLike) -> None:
    """Write the backbone as a plain transformers directory plus `projection.safetensors` (atomically)."""
    with atomic_dir(path) as out:
        _write_backbone(model, out)
        save_file(_projection_tensors(model, ""), str(out / PROJECTION_FILE), metadata={"format": "pt"})
        saved = model.config.model_copy(update={"name_or_path": ".", "backbone_config": None, "tokenizer": None})
        (out / "gemb_config.json").write_text(saved.model_dump_json(indent=2) + "\n")
        _write_info(model, out, "hf", None)


class ExportConfig(Section):
    """What `gemb export` writes, from which model."""

    model: str = Field(..., description="Gemb model directory (written by EmbeddingModel.save, a run or the soup).")
    out: str = Field(..., description="Output directory; replaced atomically if it exists.")
    format: Literal["sentence-transformers", "hf"] = Field(
        "sentence-transformers",
        description="sentence-transformers: its module layout with prompts and MRL dims; hf: the backbone as a plain "
        "transformers directory plus projection.safetensors.",
    )


def export_model(model_dir: str | os.PathLike, out: str | os.PathLike, fmt: str = "sentence-transformers") -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if Path(out).resolve() == Path(model_dir).resolve():
        raise ValueError(f"out {out} must differ from model {model_dir}")
    model = EmbeddingModel.load(model_dir)
    (export_sentence_transformers if fmt == "sentence-transformers" else export_hf)(model, out)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="Export a saved gemb model as a sentence-transformers or plain Hugging Face directory.",
        description=__doc__.split("\n\n")[0],
    )
    add_config_arguments(parser, ExportConfig, required=False)
    parser.add_argument("--model", metavar="DIR", help="same as --set model=DIR")
    parser.add_argument("--out", metavar="DIR", help="same as --set out=DIR")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args, ExportConfig, ALIASES)
    export_model(config.model, config.out, config.format)
    print(json.dumps({"exported": config.out, "format": config.format}))
    return 0


# -------------------------------------------------------------------- helpers
def _write_backbone(model: EmbeddingModel, out: Path) -> None:
    # One file, so readers never need a shard index; config.json keeps `is_causal` (attention direction).
    model.backbone.save_pretrained(str(out), safe_serialization=True, max_shard_size="1000GB")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))


def _projection_tensors(model: EmbeddingModel, prefix: str) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}weight": model.projection.weight.detach().cpu().contiguous(),
        f"{prefix}bias": model.projection.bias.detach().cpu().contiguous(),
    }


def _write_info(model: EmbeddingModel, out: Path, fmt: str, st_prompts: dict[str, str] | None) -> None:
    info = {
        "format": fmt,
        "mrl_dims": model.config.mrl_dims,
        "embedding_dim": model.embedding_dim,
        "attention": model.config.attention if model.is_decoder else "bidirectional (encoder)",
        "prompts": model.config.prompts,
        "default_prompt": model.config.default_prompt,
        "max_length": model.config.max_length,
    }
    (out / EXPORT_INFO_FILE).write_text(_json(info))
    (out / "README.md").write_text(_model_card(info, st_prompts))


def _model_card(info: dict, st_prompts: dict[str, str] | None) -> str:
    dims = info["mrl_dims"]
    lines = [
        "---",
        "library_name: sentence-transformers" if st_prompts is not None else "library_name: transformers",
        "pipeline_tag: sentence-similarity",
        "tags: [sentence-transformers, feature-extraction, matryoshka, gemb-dist]",
        "---",
        "# Text embedding model (gemb-dist)",
        "",
        f"Mean pooling over real tokens, a linear projection to {info['embedding_dim']} dims, L2 normalisation. "
        f"Matryoshka (MRL) dims: {', '.join(map(str, dims))}: the first d coordinates, renormalised, are a "
        f"d-dim embedding. Attention: {info['attention']}. Max tokens: {info['max_length']}.",
        "",
    ]
    if st_prompts is not None:
        task = next((t for t in st_prompts if t not in (QUERY_PROMPT, DOCUMENT_PROMPT)), QUERY_PROMPT)
        lines += [
            "```python",
            "from sentence_transformers import SentenceTransformer",
            "",
            f"model = SentenceTransformer(PATH, truncate_dim={dims[0]})  # any of {dims}",
            f'queries = model.encode_query(texts, prompt_name="{task}", normalize_embeddings=True)',
            "documents = model.encode_document(texts, normalize_embeddings=True)  # documents get no prompt",
            "```",
            "",
            "`normalize_embeddings=True` renormalises the truncated prefix (sentence-transformers truncates after "
            "its Normalize module); cosine similarity (`model.similarity`) does not need it.",
            "",
            "Prompts (queries only): " + json.dumps(st_prompts),
        ]
    else:
        lines += [
            "The backbone loads with `transformers.AutoModel.from_pretrained(PATH)`; `projection.safetensors` holds "
            "the projection (`weight` [D, H], `bias` [D]) applied to the masked mean of the last hidden states. "
            "`gemb_dist.model.EmbeddingModel.load(PATH)` rebuilds the whole model.",
        ]
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    import sentence_transformers
    import transformers

    return {
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "pytorch": torch.__version__,
    }


def _json(obj) -> str:
    return json.dumps(obj, indent=2) + "\n"
