#!/usr/bin/env bash
# Stop the Ray head, its worker nodes and the MLflow server started by cluster/local/start.sh: only the PIDs it recorded and their
# children, never other Ray or MLflow processes on the machine (so no `ray stop`).
set -euo pipefail
cd "$(dirname "$0")/../.."
STATE_DIR=${GEMB_LOCAL_DIR:-runs/local}

descendants() {
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null || true); do
    echo "$child"
    descendants "$child"
  done
}

stop_pidfile() {  # pidfile name expected-command-fragment grace-seconds
  local pidfile=$1 name=$2 fragment=$3 grace=$4 pid children
  [ -f "$pidfile" ] || { echo "$name: not running (no $pidfile)"; return; }
  pid=$(cat "$pidfile")
  # A stale PID file may name an unrelated process that reused the PID: check what it runs first.
  if ! kill -0 "$pid" 2>/dev/null || ! tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$fragment"; then
    echo "$name: not running (stale pid $pid)"; rm -f "$pidfile"; return
  fi
  children=$(descendants "$pid")
  kill -TERM "$pid"
  for _ in $(seq 1 $((grace * 2))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  # Whatever the graceful shutdown left behind (or everything, if it hung) is killed by PID.
  for p in $pid $children; do kill -KILL "$p" 2>/dev/null || true; done
  rm -f "$pidfile"
  echo "$name: stopped (pid $pid)"
}

stop_pidfile "$STATE_DIR/mlflow.pid" "MLflow server" "mlflow server" 15
for nodefile in "$STATE_DIR"/ray_node*.pid; do  # worker nodes (RAY_WORKER_NODES) before their head
  [ -e "$nodefile" ] || continue
  stop_pidfile "$nodefile" "Ray worker node $(basename "$nodefile" .pid | sed 's/^ray_node//')" "ray start" 20
done
stop_pidfile "$STATE_DIR/ray.pid" "Ray head" "ray start" 40
if [ -f "$STATE_DIR/ray.tmpdir" ]; then
  ray_tmp=$(cat "$STATE_DIR/ray.tmpdir")
  # Keep the session logs next to the other state; drop sockets and object-store files.
  if [ -d "$ray_tmp/session_latest/logs" ]; then
    rm -rf "$STATE_DIR/ray_logs" && mkdir -p "$STATE_DIR/ray_logs"
    cp -r "$ray_tmp/session_latest/logs/." "$STATE_DIR/ray_logs/" 2>/dev/null || true
  fi
  case "$ray_tmp" in /tmp/gemb-ray-*) rm -rf "$ray_tmp" ;; esac
  rm -f "$STATE_DIR/ray.tmpdir"
fi
