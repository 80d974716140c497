#!/usr/bin/env bash
# A real multi-node Ray cluster (head + N worker nodes) and an MLflow tracking server on this machine.
#
#   cluster/local.sh start [--workers N] [--cpus-per-node C] [--head-cpus H]
#   cluster/local.sh node start I | node stop I     # add / remove worker node I (1..N) of a running cluster
#   cluster/local.sh node preempt I [S]             # a preemption notice for node I, then its loss S s later
#   cluster/local.sh status | stop
#   eval "$(cluster/local.sh env)"
#
# The head node also offers one `validation` resource: training jobs started with
# run.validation_resources={validation: 1} validate their checkpoints there, beside the training workers.
# --head-cpus 0 keeps training workers off the head (they then run on worker nodes only).
#
# Settings (environment variables, defaults in brackets):
#   PSUNET_CLUSTER_DIR   state folder: PIDs, logs, mlflow.db, mlartifacts  [<project>/runs/cluster]
#   RAY_PORT             GCS port of the head node                         [6380]
#   RAY_DASHBOARD_PORT   dashboard and job-submission API                  [8265]
#   RAY_CLIENT_PORT      Ray Client server (outside 10002-19999, the worker port range)  [10001]
#   RAY_TEMP_ROOT        Ray's --temp-dir of the head; worker node i uses RAY_TEMP_ROOT/node-i  [/tmp/psunet-ray-$RAY_PORT]
#   MLFLOW_PORT          MLflow tracking server                            [5000]
#   MLFLOW_WORKERS       MLflow server worker processes                    [1]
#   START_TIMEOUT        seconds to wait for all nodes and MLflow          [180]
#
# Ray token authentication is on (RAY_AUTH_MODE=token); the token is ~/.ray/auth_token (created here
# when missing) unless RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH point elsewhere.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=$(realpath -m "${PSUNET_CLUSTER_DIR:-$ROOT/runs/cluster}")
CONFIG="$STATE/cluster.env"

# Settings of the running cluster win over the environment, so `stop`/`status`/`env` need no repeats.
if [[ "${1:-}" != start && -f "$CONFIG" ]]; then
    # shellcheck source=/dev/null
    source "$CONFIG"
fi
RAY_PORT=${RAY_PORT:-6380}
RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
RAY_CLIENT_PORT=${RAY_CLIENT_PORT:-10001}
RAY_TEMP_ROOT=${RAY_TEMP_ROOT:-/tmp/psunet-ray-$RAY_PORT}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
MLFLOW_WORKERS=${MLFLOW_WORKERS:-1}
START_TIMEOUT=${START_TIMEOUT:-180}

export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
DASHBOARD_URL="http://127.0.0.1:$RAY_DASHBOARD_PORT"
MLFLOW_URL="http://127.0.0.1:$MLFLOW_PORT"
# Every process this cluster starts inherits this variable; `stop` finds Ray workers and job drivers
# (which leave the node's process group) by it.
CLUSTER_ID="$STATE"

# The project's virtualenv, when present, comes first on PATH: for this script and for the nodes,
# so that `python` in a job's entrypoint is the one with Ray and the project's dependencies.
if [[ -x "$ROOT/.venv/bin/ray" ]]; then
    export PATH="$ROOT/.venv/bin:$PATH"
fi

die() { echo "local.sh: $*" >&2; exit 1; }
log() { echo "==> $*"; }

require_tools() {
    local tool
    for tool in ray mlflow python; do
        command -v "$tool" >/dev/null || die "'$tool' not found (no $ROOT/.venv and not on PATH)"
    done
}

# PIDs (not zombies) of this cluster: the Ray/MLflow processes in the recorded process groups (some
# Ray daemons overwrite their environment) plus everything carrying CLUSTER_ID.
cluster_pids() {
    local groups=() g pid state
    [[ -f "$STATE/pgids" ]] && mapfile -t groups < <(awk '{print $2}' "$STATE/pgids")
    {
        for g in "${groups[@]}"; do pgrep -g "$g" -f 'ray|mlflow|uvicorn|gunicorn|huey' || true; done
        grep -lzxF "PSUNET_CLUSTER_ID=$CLUSTER_ID" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 || true
    } | sort -un | while read -r pid; do
        state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || continue
        [[ "$state" == Z ]] || echo "$pid"
    done
}

alive_nodes() {
    ray list nodes --address "$DASHBOARD_URL" --filter state=ALIVE --format json 2>/dev/null |
        python -c 'import json, sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo 0
}

mlflow_healthy() {
    curl -fsS --max-time 2 "$MLFLOW_URL/health" >/dev/null 2>&1
}

# RAY_API_SERVER_ADDRESS serves the `ray job` CLI; RAY_ADDRESS (GCS) serves ray.init() and `ray status`,
# which reject an http:// address.
print_env() {
    echo "export RAY_ADDRESS=127.0.0.1:$RAY_PORT"
    echo "export RAY_API_SERVER_ADDRESS=$DASHBOARD_URL"
    echo "export RAY_AUTH_MODE=token"
    echo "export MLFLOW_TRACKING_URI=$MLFLOW_URL"
}

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Runs a command in a new session (process group = its PID), logging to $STATE/logs/<name>.log.
spawn() {
    local name=$1
    shift
    PSUNET_CLUSTER_ID="$CLUSTER_ID" setsid "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null &
    echo "$name $!" >>"$STATE/pgids"
    SPAWNED=$!
}

fail_start() {
    echo "local.sh: $1" >&2
    local f
    for f in "$STATE"/logs/*.log; do
        echo "---- tail of $f" >&2
        tail -n 20 "$f" >&2
    done
    echo "---- Ray logs: $RAY_TEMP_ROOT/session_latest/logs" >&2
    stop_cluster >&2
    exit 1
}

start_cluster() {
    local workers=1 cpus=1 head_cpus="" i deadline nodes mlflow_pid
    while [[ $# -gt 0 ]]; do
        case $1 in
            --workers) workers=${2:?--workers needs a number}; shift 2 ;;
            --cpus-per-node) cpus=${2:?--cpus-per-node needs a number}; shift 2 ;;
            --head-cpus) head_cpus=${2:?--head-cpus needs a number}; shift 2 ;;
            *) die "unknown option for start: $1" ;;
        esac
    done
    head_cpus=${head_cpus:-$cpus}
    [[ "$workers" =~ ^[0-9]+$ && "$cpus" =~ ^[0-9]+$ && "$head_cpus" =~ ^[0-9]+$ ]] ||
        die "--workers, --cpus-per-node and --head-cpus take whole numbers"
    require_tools

    [[ -z "$(cluster_pids)" ]] || die "a cluster with state in $STATE is running; run '$0 stop' first"
    local port
    for port in "$RAY_PORT" "$RAY_DASHBOARD_PORT" "$RAY_CLIENT_PORT" "$MLFLOW_PORT"; do
        port_free "$port" || die "port $port on 127.0.0.1 is in use (see the port variables at the top of $0)"
    done

    mkdir -p "$STATE/logs" "$STATE/mlartifacts"
    rm -f "$STATE"/logs/*.log
    : >"$STATE/pgids"
    {
        echo "RAY_PORT=$RAY_PORT"
        echo "RAY_DASHBOARD_PORT=$RAY_DASHBOARD_PORT"
        echo "RAY_CLIENT_PORT=$RAY_CLIENT_PORT"
        echo "RAY_TEMP_ROOT=$RAY_TEMP_ROOT"
        echo "MLFLOW_PORT=$MLFLOW_PORT"
        echo "NODE_CPUS=$cpus"
        echo "WORKER_NODES=$workers"
    } >"$CONFIG"

    # `ray start` with auth on refuses to run without a token; --generate keeps an existing one.
    ray get-auth-token --generate >/dev/null 2>&1 || die "could not create the Ray auth token"

    log "MLflow server on $MLFLOW_URL (state in $STATE)"
    # MLFLOW_SERVER_ENABLE_JOB_EXECUTION: no GenAI job runner (7 extra processes, unused for tracking).
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
        spawn mlflow mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
        --backend-store-uri "sqlite:///$STATE/mlflow.db" \
        --serve-artifacts --artifacts-destination "$STATE/mlartifacts"
    mlflow_pid=$SPAWNED

    # Ray replaces a loopback --node-ip-address with this host's routable IP on Linux, so it is not
    # passed; the dashboard and MLflow listen on 127.0.0.1 only. --dashboard-agent-listen-port 0
    # lets each node's agent pick a free port, as several nodes share this machine.
    # Jobs, tasks and actors inherit MLFLOW_TRACKING_URI from their node.
    export MLFLOW_TRACKING_URI="$MLFLOW_URL"
    # Every process of this cluster knows its own address: with several Ray instances on one machine,
    # Ray's state API (used by Ray Train to clean up after a stopped run) would otherwise pick another.
    export RAY_ADDRESS="127.0.0.1:$RAY_PORT" RAY_API_SERVER_ADDRESS="$DASHBOARD_URL"
    log "Ray head on port $RAY_PORT ($head_cpus CPUs, 1 validation slot)"
    spawn head ray start --head --port "$RAY_PORT" --num-cpus "$head_cpus" --resources '{"validation": 1}' \
        --dashboard-host 127.0.0.1 --dashboard-port "$RAY_DASHBOARD_PORT" \
        --ray-client-server-port "$RAY_CLIENT_PORT" --dashboard-agent-listen-port 0 \
        --temp-dir "$RAY_TEMP_ROOT" --log-color false
    wait "$SPAWNED" || fail_start "the Ray head did not start"

    for ((i = 1; i <= workers; i++)); do
        start_node "$i" "$cpus" || fail_start "Ray worker node $i did not start"
    done

    deadline=$((SECONDS + START_TIMEOUT))
    until nodes=$(alive_nodes) && [[ "$nodes" -eq $((workers + 1)) ]] && mlflow_healthy; do
        kill -0 "$mlflow_pid" 2>/dev/null || fail_start "the MLflow server exited"
        ((SECONDS < deadline)) ||
            fail_start "after ${START_TIMEOUT}s: $nodes/$((workers + 1)) Ray nodes alive, MLflow healthy: $(mlflow_healthy && echo yes || echo no)"
        sleep 1
    done

    cat <<EOF

Cluster up: $nodes Ray nodes, MLflow healthy.
  Ray dashboard:  $DASHBOARD_URL   (it asks for the token: ray get-auth-token)
  MLflow UI:      $MLFLOW_URL
  Ray logs:       $RAY_TEMP_ROOT/session_latest/logs (head), $RAY_TEMP_ROOT/node-*/session_latest/logs
  Submit jobs with:
$(print_env | sed 's/^/    /')
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/train.py --config configs/<preset>.yaml
  Stop with: $0 stop
EOF
}

# Worker node i: its own temp dir, so that each node's log monitor forwards only its own workers' output
# (one shared folder would print every line once per node).
start_node() {
    local i=$1 cpus=$2
    log "Ray worker node $i ($cpus CPUs)"
    spawn "worker-$i" ray start --address "127.0.0.1:$RAY_PORT" --num-cpus "$cpus" \
        --dashboard-agent-listen-port 0 --temp-dir "$RAY_TEMP_ROOT/node-$i" --log-color false
    wait "$SPAWNED"
}

# Every process of worker node i (its raylet and everything the raylet started: Ray workers, the
# node's agents): what a lost machine takes with it.
node_pids() {
    local raylet
    raylet=$(raylet_pid "$1")
    [[ -n "$raylet" ]] || return 0
    { echo "$raylet"; descendants "$raylet"; pgrep -f -- "$RAY_TEMP_ROOT/node-$1/" || true; } | sort -un
}

raylet_pid() {
    pgrep -f "raylet.*--temp_dir=$RAY_TEMP_ROOT/node-$1( |$)" | head -n 1 || true
}

descendants() {
    local child
    for child in $(pgrep -P "$1"); do
        echo "$child"
        descendants "$child"
    done
}

# `node stop I` kills worker node I with SIGKILL, as a machine that disappears; `node preempt I S` first
# announces it (a spot VM's preemption notice: Ray drains the node with a deadline S seconds away), then
# kills it S seconds later; `node start I` brings it back.
node_command() {
    local action=${1:-} i=${2:-} seconds=${3:-30} pids raylet
    [[ -f "$CONFIG" ]] || die "no running cluster with state in $STATE"
    [[ "$i" =~ ^[1-9][0-9]*$ ]] || die "usage: $0 node {start|stop|preempt} I [SECONDS] (I = 1..$WORKER_NODES)"
    case $action in
        preempt)
            [[ "$seconds" =~ ^[0-9]+$ ]] || die "node preempt: SECONDS must be a whole number"
            raylet=$(raylet_pid "$i")
            [[ -n "$raylet" ]] || die "worker node $i is not running"
            ray drain-node --address "127.0.0.1:$RAY_PORT" \
                --node-id "$(tr '\0' '\n' <"/proc/$raylet/cmdline" | sed -n 's/^--node_id=//p')" \
                --reason DRAIN_NODE_REASON_PREEMPTION --reason-message "local.sh node preempt $i" \
                --deadline-remaining-seconds "$seconds" >/dev/null || die "could not drain worker node $i"
            log "worker node $i: preemption notice, killed in $seconds s"
            sleep "$seconds"
            node_command stop "$i" ;;
        stop)
            pids=$(node_pids "$i")
            [[ -n "$pids" ]] || die "worker node $i is not running"
            kill -KILL $pids 2>/dev/null || true
            log "worker node $i killed ($(wc -w <<<"$pids") processes)" ;;
        start)
            [[ -z "$(node_pids "$i")" ]] || die "worker node $i is running"
            start_node "$i" "$NODE_CPUS" || die "worker node $i did not start; see $STATE/logs/worker-$i.log" ;;
        *) die "usage: $0 node {start|stop|preempt} I [SECONDS]" ;;
    esac
}

stop_cluster() {
    local pids i=0
    pids=$(cluster_pids)
    [[ -z "$pids" ]] || kill -TERM $pids 2>/dev/null || true
    while [[ -n "$pids" ]] && ((i++ < 20)); do
        sleep 0.5
        pids=$(cluster_pids)
        # gcs_server and idle Ray workers ignore SIGTERM: after 2 s, SIGKILL the rest (as `ray stop --force`).
        ((i >= 4)) && [[ -n "$pids" ]] && { kill -KILL $pids 2>/dev/null || true; }
    done
    [[ -z "$pids" ]] || die "processes of this cluster still alive: $pids"
    rm -f "$CONFIG" "$STATE/pgids"
    log "stopped (state kept in $STATE)"
}

status_cluster() {
    require_tools
    local nodes rc=0
    nodes=$(alive_nodes)
    echo "Ray:    $nodes alive node(s) at $DASHBOARD_URL"
    if mlflow_healthy; then
        echo "MLflow: healthy at $MLFLOW_URL"
    else
        echo "MLflow: not answering at $MLFLOW_URL"
        rc=1
    fi
    [[ "$nodes" -gt 0 ]] || rc=1
    return $rc
}

case "${1:-}" in
    start) shift; start_cluster "$@" ;;
    stop) stop_cluster ;;
    status) status_cluster ;;
    env) print_env ;;
    node) shift; node_command "$@" ;;
    *) die "usage: $0 {start [--workers N] [--cpus-per-node C] [--head-cpus H]|node {start|stop|preempt} I|stop|status|env}" ;;
esac
