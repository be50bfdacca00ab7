"""Demo data from real text available offline: the docstrings of the installed Python standard library.

Each documented public module, class, function or method gives one (title, passage) pair, like the paper's
title/passage pre-finetuning pairs: the query is the qualified name with the docstring's summary, the positive
is the rest of the docstring. Sources are parsed (never imported), so building has no side effects and the
output is the same for the same Python version. A hashed split holds out pairs for evaluation as a BEIR-style
retrieval set plus a labelled pairs file.

    python recipes/demo/demo_data.py --output demo_out/data
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import os
import re
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TASK = "stdlib_docs"
SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "_bundled"}
MIN_PASSAGE_WORDS = 8
MAX_PASSAGE_CHARS = 2000
SENTENCE_END = re.compile(r"[.!?]\s+(?=[A-Z(`'\"])")
ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "Mr.", "Dr.")


@dataclass(frozen=True)
class DocPair:
    name: str  # qualified name, e.g. "json.dumps" or "collections.OrderedDict.move_to_end"
    query: str
    passage: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_name(path: Path, root: Path) -> str | None:
    """`email/mime/text.py` -> `email.mime.text`; None for private modules (they repeat public docs)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or any(p.startswith("_") or not p.isidentifier() for p in parts):
        return None
    return ".".join(parts)


def split_docstring(doc: str) -> tuple[str, str]:
    """(summary, body): the docstring's first sentence on one line, and the rest of the docstring.

    The summary ends at the first blank line or at the first sentence end inside the first paragraph, whichever
    comes first, so that one-paragraph docstrings ("Return X. Raise Y if Z.") still give a pair.
    """
    text = inspect.cleandoc(doc)
    first, _, rest = text.partition("\n\n")
    sentence_end = _first_sentence_end(first)
    if sentence_end is not None:
        first, rest = first[:sentence_end], (first[sentence_end:].strip() + "\n\n" + rest).strip()
    summary = " ".join(first.split())
    body = rest.strip()
    if len(body) > MAX_PASSAGE_CHARS:  # long reference sections add tokens the model truncates anyway
        body = body[:MAX_PASSAGE_CHARS].rsplit(maxsplit=1)[0]
    return summary, body


def _first_sentence_end(paragraph: str) -> int | None:
    """Index just past the first ". " that ends a sentence (not "e.g. "), or None when the paragraph is one."""
    for match in SENTENCE_END.finditer(paragraph):
        if not paragraph[: match.start() + 1].endswith(ABBREVIATIONS):
            end = match.start() + 1
            return end if paragraph[end:].strip() else None
    return None


def _documented(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of the module, its public classes and functions, and public methods."""
    if doc := ast.get_docstring(tree, clean=False):
        yield module, doc
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) or node.name.startswith("_"):
            continue
        if doc := ast.get_docstring(node, clean=False):
            yield f"{module}.{node.name}", doc
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                is_method = isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef)
                if is_method and not member.name.startswith("_") and (doc := ast.get_docstring(member, clean=False)):
                    yield f"{module}.{node.name}.{member.name}", doc


def iter_doc_pairs(root: Path | None = None) -> Iterator[DocPair]:
    """Every usable pair under the stdlib `root`, in sorted file order, without repeated queries or passages."""
    root = root or stdlib_dir()
    seen_queries: set[str] = set()
    seen_passages: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_DIRS.intersection(path.relative_to(root).parts) or (module := module_name(path, root)) is None:
            continue
        try:
            with tokenize.open(path) as f:
                tree = ast.parse(f.read(), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few data files in the stdlib are deliberately not valid Python 3
        for name, doc in _documented(tree, module):
            summary, body = split_docstring(doc)
            query = f"{name}: {summary}" if summary else ""
            if not summary or len(body.split()) < MIN_PASSAGE_WORDS:
                continue
            if query in seen_queries or body in seen_passages:
                continue
            seen_queries.add(query)
            seen_passages.add(body)
            yield DocPair(name, query, body)


def is_heldout(pair: DocPair, heldout_permille: int) -> bool:
    digest = hashlib.blake2b(pair.name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 1000 < heldout_permille


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_heldout(pairs: list[DocPair], out: Path) -> None:
    """BEIR layout (corpus.jsonl, queries.jsonl, qrels/test.tsv) plus pairs.jsonl with matched/mismatched labels."""
    _write_jsonl(out / "corpus.jsonl", [{"_id": f"doc-{p.name}", "title": "", "text": p.passage} for p in pairs])
    _write_jsonl(out / "queries.jsonl", [{"_id": f"q-{p.name}", "text": p.query} for p in pairs])
    qrels = "".join(f"q-{p.name}\tdoc-{p.name}\t1\n" for p in pairs)
    _write_text(out / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\n" + qrels)
    # Each query once with its own passage (label 1) and once with a passage from halfway round the list (label 0).
    half = max(1, len(pairs) // 2)
    labelled = []
    for i, pair in enumerate(pairs):
        labelled.append({"sentence1": pair.query, "sentence2": pair.passage, "label": 1})
        if len(pairs) > 1:
            labelled.append({"sentence1": pair.query, "sentence2": pairs[(i + half) % len(pairs)].passage, "label": 0})
    _write_jsonl(out / "pairs.jsonl", labelled)


def build_demo_data(out: Path, heldout_permille: int = 100, max_train: int | None = None, root: Path | None = None):
    """Write `train.jsonl`, `heldout/` and `stats.json` under `out`; returns the stats dict."""
    if not 0 < heldout_permille < 1000:
        raise ValueError(f"heldout_permille must be in 1..999, got {heldout_permille}")
    pairs = list(iter_doc_pairs(root))
    heldout = [p for p in pairs if is_heldout(p, heldout_permille)]
    train = [p for p in pairs if not is_heldout(p, heldout_permille)][:max_train]
    if not train or not heldout:
        raise ValueError(f"found too few documented names under {root or stdlib_dir()} to build demo data")
    out = Path(out)
    _write_jsonl(
        out / "train.jsonl", [{"id": p.name, "task": TASK, "query": p.query, "positive": p.passage} for p in train]
    )
    write_heldout(heldout, out / "heldout")
    stats = {
        "source": f"docstrings of the Python {sys.version.split()[0]} standard library at {root or stdlib_dir()}",
        "task": TASK,
        "num_train": len(train),
        "num_heldout": len(heldout),
    }
    _write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, type=Path, help="Directory for train.jsonl and heldout/.")
    parser.add_argument("--heldout-permille", type=int, default=100, help="Pairs held out for evaluation, per 1000.")
    parser.add_argument("--max-train", type=int, default=None, help="Keep at most this many training pairs.")
    args = parser.parse_args(argv)
    try:
        stats = build_demo_data(args.output, args.heldout_permille, args.max_train)
    except ValueError as err:
        print(f"demo_data: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
