"""`gemb eval`: score a model on STS, retrieval, classification, clustering and pair tasks at each MRL dim."""

from __future__ import annotations

import argparse

from gemb_dist.config import MLflowConfig, build_config
from gemb_dist.evaluate.runner import EvalConfig, run_evaluation


def _dims(text: str) -> list[int]:
    try:
        return [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dims must be comma-separated integers, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="Evaluate a model on MTEB-style tasks at each MRL dim.")
    parser.add_argument("--model", required=True, help="Gemb model dir, sentence-transformers dir or HF model dir.")
    parser.add_argument("--dims", type=_dims, help="Comma-separated MRL dims, e.g. 64,128,384 (default: model's).")
    parser.add_argument("--sts", help="STS file (csv/tsv/jsonl: sentence1, sentence2, score).")
    parser.add_argument("--retrieval", help="BEIR dir (corpus.jsonl, queries.jsonl, qrels/test.tsv).")
    parser.add_argument("--classification", metavar="TRAIN,TEST", help="Two CSVs with text,label.")
    parser.add_argument("--clustering", help="CSV with text,label.")
    parser.add_argument("--pairs", help="CSV with sentence1, sentence2, label (0/1).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ray-actors", type=int, default=0, help="Encode on N Ray actors (0: in this process).")
    parser.add_argument("--device", help="Torch device (default cpu).")
    parser.add_argument("--mlflow-tracking-uri", help="Log table and plot here (default $MLFLOW_TRACKING_URI).")
    parser.add_argument("--run-name", help="MLflow run name.")
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars.")
    parser.add_argument("--out", required=True, help="Results JSON; the MRL plot is written beside it (.png).")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    raw = {
        "model": args.model,
        "dims": args.dims,
        "batch_size": args.batch_size,
        "ray_actors": args.ray_actors,
        "device": args.device,
        "out": args.out,
        "run_name": args.run_name,
        "progress": not args.no_progress,
        **{name: getattr(args, name) for name in ("sts", "retrieval", "classification", "clustering", "pairs")},
    }
    if args.mlflow_tracking_uri:
        raw["mlflow"] = MLflowConfig(tracking_uri=args.mlflow_tracking_uri).model_dump()
    run_evaluation(build_config(raw, cls=EvalConfig))
    return 0
