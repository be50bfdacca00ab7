#!/usr/bin/env bash
# The image's smoke test, run inside the image with no network (`make image-smoke` pipes it to `bash -s`):
# the CLI, every shipped config, a shard build, and the CPU smoke training submitted to a Ray head started here,
# through the job API and from the image's working directory, as a KubeRay RayJob submits its entrypoint.
# Ends with one JSON line: {"smoke": "ok", ...}.
set -euo pipefail
cd /app
work=$(mktemp -d /tmp/gemb-smoke-XXXXXX)
step() { echo "smoke: $*" >&2; }

step "user $(id -u):$(id -g), python $(python -c 'import sys; print(sys.version.split()[0])'), cwd $PWD"
[ "$(id -u)" != 0 ] || { echo "smoke: the image runs as root; the manifests require a non-root user" >&2; exit 1; }

step "gemb --help"
gemb --help > /dev/null

step "gemb config show on every shipped config"
for config in jobs/configs/*.yaml; do
  gemb config show --config "$config" > /dev/null || { echo "smoke: config $config does not validate" >&2; exit 1; }
done

step "gemb data build"
python - "$work/pairs.jsonl" <<'EOF'
import json, random, sys
# Each query's positive repeats its topic words: learnable from the tokens in a few steps.
words = "apple river mountain velvet compass glacier lantern meadow harbor falcon orchid summit".split()
rng = random.Random(0)
with open(sys.argv[1], "w") as out:
    for i in range(128):
        topic = rng.sample(words, 3)
        out.write(json.dumps({"task": "smoke", "query": " ".join(topic), "positive": f"on {topic[0]}, {topic[1]} and {topic[2]} #{i}"}) + "\n")
EOF
gemb data build --input "$work/pairs.jsonl" --output "$work/shards" > /dev/null
test -f "$work/shards/manifest.json"

step "ray start --head (token auth, 127.0.0.1 only)"
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(16))')
export RAY_AUTH_TOKEN
export RAY_ADDRESS=127.0.0.1:6379
# Ray gives its raylet a fixed 30 s to register; on a loaded machine it can miss that, so start up to 3 times
# (`ray stop` here ends only this container's processes).
for attempt in 1 2 3; do
  ray start --head --disable-usage-stats --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
    --include-dashboard=true --num-cpus=2 --object-store-memory=300000000 > "$work/ray-start.log" 2>&1 && break
  step "ray start attempt $attempt failed: $(tail -n 1 "$work/ray-start.log")"
  ray stop --force > /dev/null 2>&1 || true
  [ "$attempt" != 3 ] || { tail -n 40 "$work/ray-start.log" >&2; exit 1; }
done
python -c 'import os; from gemb_dist.ray_ready import wait_for_job_api
wait_for_job_api("http://127.0.0.1:8265", {"Authorization": "Bearer " + os.environ["RAY_AUTH_TOKEN"]})'

step "ray job submit: jobs/prefinetune.py --config jobs/configs/smoke_cpu.yaml"
RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --submission-id gemb-smoke -- \
  python jobs/prefinetune.py --config jobs/configs/smoke_cpu.yaml --run-name smoke \
  --set "data.shards=$work/shards" --set "ray.storage_path=$work/runs" > "$work/job.log" 2>&1 \
  || { tail -n 80 "$work/job.log" >&2; exit 1; }

step "load the saved model"
python - "$work/runs/smoke/model" <<'EOF'
import json, sys
from gemb_dist.model import EmbeddingModel

model = EmbeddingModel.load(sys.argv[1])
embeddings = model.embed(["apple river mountain", "on apple, river and mountain", "velvet compass glacier"])
assert tuple(embeddings.shape) == (3, model.config.mrl_dims[-1]), embeddings.shape
print(json.dumps({"smoke": "ok", "model": sys.argv[1], "mrl_dims": model.config.mrl_dims}))
EOF
