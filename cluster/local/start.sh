#!/usr/bin/env bash
# Start a local Ray head and an MLflow tracking server, both bound to 127.0.0.1 only.
#
#   cluster/local/start.sh && source runs/local/env.sh
#   ray job submit --working-dir . -- python jobs/...
#   cluster/local/stop.sh             # stops exactly the processes started here
#
# State (PID files, logs, the Ray auth token, the MLflow sqlite database and artifacts) lives in $GEMB_LOCAL_DIR
# (default runs/local). Ports: RAY_PORT (6379), RAY_DASHBOARD_PORT (8265), MLFLOW_PORT (5000); RAY_NUM_CPUS defaults
# to all cores. Running it again while both servers are up is a no-op.
#
# RAY_WORKER_NODES=N adds N worker nodes (separate raylets joined with `ray start --address`), each with
# RAY_WORKER_NODE_CPUS CPUs (default 1) and the custom resources {"gemb_worker_node": 1, "gemb_node_<i>": 1}:
# a job asking `ray.resources_per_worker={CPU: 1, gemb_worker_node: 1}` gets one training worker per node.
# The head's environment carries MLFLOW_TRACKING_URI (this MLflow server), so jobs log there without flags.
set -euo pipefail
cd "$(dirname "$0")/../.."

STATE_DIR=$(mkdir -p "${GEMB_LOCAL_DIR:-runs/local}" && cd "${GEMB_LOCAL_DIR:-runs/local}" && pwd)
VENV=${VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
RAY_PORT=${RAY_PORT:-6379}
RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
# `nproc` honours OMP_NUM_THREADS (often 1 on shared machines); the head must offer every core.
RAY_NUM_CPUS=${RAY_NUM_CPUS:-$(nproc --all)}
RAY_WORKER_NODES=${RAY_WORKER_NODES:-0}
RAY_WORKER_NODE_CPUS=${RAY_WORKER_NODE_CPUS:-1}
# Every node's object store lives in the one /dev/shm: Ray's default (30% of memory each) overcommits it.
RAY_WORKER_NODE_OBJECT_STORE_MB=${RAY_WORKER_NODE_OBJECT_STORE_MB:-512}
JOB_MLFLOW_URI=http://127.0.0.1:$MLFLOW_PORT
# Jobs run `python ...` from the head's PATH: the project's environment must come first.
export PATH="$VENV/bin:$PATH"
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "start.sh: no Python environment at $VENV; run 'make venv' first" >&2; exit 2; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

free_ports() {  # seven free ports on 127.0.0.1, for one raylet's internal servers
  "$PY" -c 'import socket
socks = [socket.socket() for _ in range(7)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))'
}

port_free() {
  # SO_REUSEADDR as the servers use it: a port left in TIME_WAIT by an earlier run counts as free.
  "$PY" -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null
}

PROBE='import pathlib, sys, urllib.request
url, token_file = sys.argv[1:]
headers = {"Authorization": "Bearer " + pathlib.Path(token_file).read_text().strip()} if token_file else {}
urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2)'

wait_http() {  # url pidfile logfile name [bearer-token-file]
  local deadline=$((SECONDS + 180))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if "$PY" -c "$PROBE" "$1" "${5:-}" 2>/dev/null; then return 0; fi
    if ! alive "$2"; then
      echo "start.sh: $4 exited during start; last lines of $3:" >&2; tail -n 30 "$3" >&2; return 1
    fi
    sleep 0.5
  done
  echo "start.sh: $4 did not answer $1 within 180 s; see $3" >&2
  return 1
}

start_ray() {
  if alive "$STATE_DIR/ray.pid"; then echo "Ray head already running (pid $(cat "$STATE_DIR/ray.pid"))"; return; fi
  for port in "$RAY_PORT" "$RAY_DASHBOARD_PORT"; do
    port_free "$port" || { echo "start.sh: port $port is in use; set RAY_PORT / RAY_DASHBOARD_PORT" >&2; exit 2; }
  done
  # Ray's unix sockets live under its temp dir and must stay short: keep it in /tmp, recorded for stop.sh.
  local ray_tmp
  ray_tmp=$(mktemp -d /tmp/gemb-ray-XXXXXX)
  echo "$ray_tmp" > "$STATE_DIR/ray.tmpdir"
  # Ray's internal ports (node manager, object manager, job agent, ...) default to fixed numbers that another
  # Ray on the machine (a `ray.init()` in some process) may hold; without its agent the head takes no jobs.
  local internal
  internal=$(free_ports)
  read -r p_nm p_om p_client p_agent_grpc p_agent_http p_env_agent p_metrics <<< "$internal"
  # RAY_ADDRESS reaches every Ray process: Ray's own helpers that look the cluster up would otherwise fail as
  # soon as a second Ray instance runs on the machine ("Found multiple active Ray instances").
  # MLFLOW_TRACKING_URI reaches every job driver and worker this head starts: `ray job submit` does not pass
  # the submitting shell's environment on, and a job without it would log to a sqlite file nobody looks at.
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" \
    MLFLOW_TRACKING_URI="$JOB_MLFLOW_URI" RAY_ADDRESS="127.0.0.1:$RAY_PORT" \
    setsid ray start --head --block --disable-usage-stats \
    --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --include-dashboard=true \
    --port="$RAY_PORT" --dashboard-port="$RAY_DASHBOARD_PORT" --num-cpus="$RAY_NUM_CPUS" \
    --node-manager-port="$p_nm" --object-manager-port="$p_om" --ray-client-server-port="$p_client" \
    --dashboard-agent-grpc-port="$p_agent_grpc" --dashboard-agent-listen-port="$p_agent_http" \
    --runtime-env-agent-port="$p_env_agent" --metrics-export-port="$p_metrics" \
    --temp-dir="$ray_tmp" > "$STATE_DIR/ray.log" 2>&1 < /dev/null &
  echo $! > "$STATE_DIR/ray.pid"
}

start_worker_node() {  # index
  local i=$1 pidfile="$STATE_DIR/ray_node$1.pid"
  if alive "$pidfile"; then echo "Ray worker node $i already running (pid $(cat "$pidfile"))"; return; fi
  local internal
  internal=$(free_ports)
  read -r p_nm p_om _ p_agent_grpc p_agent_http p_env_agent p_metrics <<< "$internal"
  # `ray start --block` stays the parent of this node's raylet and everything under it: stop.sh (and a
  # node-loss drill) ends exactly this node through its PID.
  # =1: Ray refuses `ray start --address` (a worker node) otherwise; the node still binds 127.0.0.1 only. The
  # head's address is spelled IPv4-mapped: Ray rewrites a literal 127.0.0.1 / localhost into the machine's
  # routable IP, where the head (bound to 127.0.0.1) does not listen.
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" \
    MLFLOW_TRACKING_URI="$JOB_MLFLOW_URI" RAY_ADDRESS="127.0.0.1:$RAY_PORT" setsid ray start --block \
    --address="[::ffff:127.0.0.1]:$RAY_PORT" --node-ip-address=127.0.0.1 --disable-usage-stats \
    --object-store-memory=$((RAY_WORKER_NODE_OBJECT_STORE_MB * 1024 * 1024)) \
    --num-cpus="$RAY_WORKER_NODE_CPUS" --resources="{\"gemb_worker_node\": 1, \"gemb_node_$i\": 1}" \
    --node-manager-port="$p_nm" --object-manager-port="$p_om" --dashboard-agent-grpc-port="$p_agent_grpc" \
    --dashboard-agent-listen-port="$p_agent_http" --runtime-env-agent-port="$p_env_agent" \
    --metrics-export-port="$p_metrics" > "$STATE_DIR/ray_node$i.log" 2>&1 < /dev/null &
  echo $! > "$pidfile"
}

wait_nodes() {  # count: that many worker nodes registered with the head, alive
  "$PY" - "$1" <<'PYEOF' || { echo "start.sh: worker nodes did not join; see $STATE_DIR/ray_node*.log" >&2; return 1; }
import sys, time
import ray
want = int(sys.argv[1])
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + 180
while time.monotonic() < deadline:
    if sum(1 for n in ray.nodes() if n["Alive"] and "gemb_worker_node" in n["Resources"]) >= want:
        sys.exit(0)
    time.sleep(0.5)
sys.exit(1)
PYEOF
}

start_mlflow() {
  if alive "$STATE_DIR/mlflow.pid"; then echo "MLflow already running (pid $(cat "$STATE_DIR/mlflow.pid"))"; return; fi
  port_free "$MLFLOW_PORT" || { echo "start.sh: port $MLFLOW_PORT is in use; set MLFLOW_PORT" >&2; exit 2; }
  mkdir -p "$STATE_DIR/mlflow"
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$STATE_DIR/mlflow/mlflow.db" --artifacts-destination "$STATE_DIR/mlflow/artifacts" \
    > "$STATE_DIR/mlflow.log" 2>&1 < /dev/null &
  echo $! > "$STATE_DIR/mlflow.pid"
}

# Ray's job API runs any code it is sent: it requires this cluster's own token (clients: source env.sh).
TOKEN_FILE="$STATE_DIR/ray_auth_token"
if [ ! -s "$TOKEN_FILE" ]; then
  (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$TOKEN_FILE")
fi

start_ray
start_mlflow
wait_http "http://127.0.0.1:$RAY_DASHBOARD_PORT/api/version" "$STATE_DIR/ray.pid" "$STATE_DIR/ray.log" "Ray head" \
  "$TOKEN_FILE" \
  || { cluster/local/stop.sh; exit 1; }
# The dashboard answers before the head's job agent registers; a job submitted in between is refused.
"$PY" -c 'import pathlib, sys; from gemb_dist.ray_ready import wait_for_job_api
token = pathlib.Path(sys.argv[2]).read_text().strip()
wait_for_job_api(sys.argv[1], headers={"Authorization": "Bearer " + token})' \
  "http://127.0.0.1:$RAY_DASHBOARD_PORT" "$TOKEN_FILE" || { cluster/local/stop.sh; exit 1; }
wait_http "http://127.0.0.1:$MLFLOW_PORT/health" "$STATE_DIR/mlflow.pid" "$STATE_DIR/mlflow.log" "MLflow server" \
  || { cluster/local/stop.sh; exit 1; }
if [ "$RAY_WORKER_NODES" -gt 0 ]; then
  # One at a time: nodes on one machine share the head's session directory, and two raylets starting together
  # pick the same unix socket name there (the second dies with "bind: Address already in use").
  for i in $(seq 1 "$RAY_WORKER_NODES"); do
    start_worker_node "$i"
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" \
      RAY_ADDRESS="127.0.0.1:$RAY_PORT" wait_nodes "$i" \
      || { cluster/local/stop.sh; exit 1; }
  done
fi

cat > "$STATE_DIR/env.sh" <<EOF
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
EOF
cat <<EOF
Local cluster is up (state in $STATE_DIR):
  Ray dashboard / job API  http://127.0.0.1:$RAY_DASHBOARD_PORT   (GCS 127.0.0.1:$RAY_PORT, $RAY_NUM_CPUS CPUs)
  worker nodes             $RAY_WORKER_NODES x $RAY_WORKER_NODE_CPUS CPU (resources gemb_worker_node, gemb_node_<i>)
  MLflow UI / tracking     http://127.0.0.1:$MLFLOW_PORT
  source $STATE_DIR/env.sh   # job API address, Ray auth token, MLFLOW_TRACKING_URI for your shell
  (the dashboard asks for the token in $STATE_DIR/ray_auth_token)
  cluster/local/stop.sh      # stops both
EOF
