#!/usr/bin/env bash
# A real Dask cluster on this machine, on 127.0.0.1 only: one `dask scheduler` and
# N `dask worker` processes running in the background.
#
#   cluster/local-cluster.sh start [N_WORKERS]   start (default 2 workers), wait until registered
#   cluster/local-cluster.sh status              show what runs (exit 0 running, 3 not running)
#   cluster/local-cluster.sh stop                stop everything started by `start`
#
# Then:  dglmm fit DATA --formula ... --family ... --scheduler tcp://127.0.0.1:8786
#   or:  dglmm fit DATA --formula ... --family ... --scheduler-file .dask-local/scheduler.json
#
# Settings (environment variables):
#   DGLMM_LOCAL_CLUSTER_DIR        state dir with PIDs, logs, scheduler file  [.dask-local]
#   DGLMM_LOCAL_CLUSTER_PORT       scheduler port                             [8786]
#   DGLMM_LOCAL_CLUSTER_DASHBOARD  scheduler dashboard address                [127.0.0.1:8787]
#                                  (use 127.0.0.1:0 for a free port, "none" for no dashboard)
#   DGLMM_LOCAL_CLUSTER_THREADS    threads per worker                         [1]
#   DGLMM_LOCAL_CLUSTER_MEMORY     --memory-limit per worker                  [auto]
#   DGLMM_LOCAL_CLUSTER_TIMEOUT    seconds to wait for start/stop             [60]
#   PYTHON                         interpreter whose dask/distributed is used [python3]
#
# The processes are started with `$PYTHON -m dask scheduler|worker` (the `dask` command of
# that interpreter), so the processes and the readiness check use the same distributed.
set -euo pipefail

STATE_DIR="${DGLMM_LOCAL_CLUSTER_DIR:-.dask-local}"
PORT="${DGLMM_LOCAL_CLUSTER_PORT:-8786}"
DASHBOARD="${DGLMM_LOCAL_CLUSTER_DASHBOARD:-127.0.0.1:8787}"
THREADS="${DGLMM_LOCAL_CLUSTER_THREADS:-1}"
MEMORY="${DGLMM_LOCAL_CLUSTER_MEMORY:-auto}"
TIMEOUT="${DGLMM_LOCAL_CLUSTER_TIMEOUT:-60}"
if [[ -z "${PYTHON:-}" ]]; then
    if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi
HOST=127.0.0.1

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
}

die() {
    echo "local-cluster: $*" >&2
    exit 1
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

abs_state_dir() {
    mkdir -p "$STATE_DIR"
    # Keep the state dir out of git wherever it is created.
    [[ -f "$STATE_DIR/.gitignore" ]] || echo '*' >"$STATE_DIR/.gitignore"
    (cd "$STATE_DIR" && pwd)
}

pid_alive() {
    local pid="$1"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

read_pid() {
    local f="$1"
    [[ -f "$f" ]] && tr -dc '0-9' <"$f" || true
}

# Start "$@" in the background, in its own session when setsid exists (so that `stop` can
# signal the whole process group: a worker's nanny and the worker process it forks), with
# stdout/stderr to $2 and its PID written to $1 by the process itself (correct even if
# setsid forks).
spawn() {
    local pidfile="$1" logfile="$2"
    shift 2
    local launcher=()
    if command -v setsid >/dev/null 2>&1; then launcher=(setsid); fi
    # shellcheck disable=SC2016
    nohup "${launcher[@]}" sh -c 'echo $$ > "$0"; exec "$@"' "$pidfile" "$@" \
        </dev/null >"$logfile" 2>&1 &
}

wait_for_pidfile() {
    local f="$1" i
    for ((i = 0; i < 50; i++)); do
        [[ -s "$f" ]] && return 0
        sleep 0.1
    done
    return 1
}

# Signal a process and its process group (when it leads one).
signal_tree() {
    local sig="$1" pid="$2"
    if [[ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" == "$pid" ]]; then
        kill "-$sig" -- "-$pid" 2>/dev/null || true
    else
        kill "-$sig" "$pid" 2>/dev/null || true
    fi
}

# Stop the processes of the given PID files together: SIGTERM (graceful), then SIGKILL after
# the timeout, then SIGKILL to anything left in their process groups (orphaned children).
stop_pidfiles() {
    local f pid deadline alive pids=()
    for f in "$@"; do
        pid="$(read_pid "$f")"
        if pid_alive "$pid"; then
            signal_tree TERM "$pid"
            pids+=("$pid")
        fi
    done
    deadline=$((SECONDS + TIMEOUT))
    while ((SECONDS < deadline)); do
        alive=0
        for pid in "${pids[@]}"; do pid_alive "$pid" && alive=1; done
        ((alive == 0)) && break
        sleep 0.2
    done
    for pid in "${pids[@]}"; do
        if pid_alive "$pid"; then
            echo "local-cluster: PID $pid did not stop in ${TIMEOUT}s; killing it" >&2
        fi
        signal_tree KILL "$pid"
    done
    rm -f "$@"
}

cmd_stop() {
    local dir stopped=0 workers
    dir="$(abs_state_dir)"
    shopt -s nullglob
    workers=("$dir"/worker-*.pid)
    # Workers first so they do not try to reconnect to a vanished scheduler.
    if ((${#workers[@]} > 0)); then
        stop_pidfiles "${workers[@]}"
        stopped=1
    fi
    if [[ -f "$dir/scheduler.pid" ]]; then
        stop_pidfiles "$dir/scheduler.pid"
        stopped=1
    fi
    rm -f "$dir/scheduler.json" "$dir/address"
    if ((stopped == 0)); then
        echo "local cluster not running (state dir $dir)"
    else
        echo "local cluster stopped (state dir $dir)"
    fi
}

cmd_status() {
    local dir f pid running=0 name
    dir="$(abs_state_dir)"
    shopt -s nullglob
    for f in "$dir"/scheduler.pid "$dir"/worker-*.pid; do
        [[ -f "$f" ]] || continue
        pid="$(read_pid "$f")"
        name="$(basename "$f" .pid)"
        if pid_alive "$pid"; then
            echo "$name: running (PID $pid, log $dir/$name.log)"
            [[ "$name" == scheduler ]] && running=1
        else
            echo "$name: not running (stale PID file)"
        fi
    done
    if ((running == 0)); then
        echo "local cluster not running (state dir $dir)"
        return 3
    fi
    echo "scheduler: $(cat "$dir/address" 2>/dev/null || echo "tcp://$HOST:?")"
    echo "scheduler-file: $dir/scheduler.json"
    "$PYTHON" - "$dir/scheduler.json" <<'EOF' || true
import sys
from distributed import Client
with Client(scheduler_file=sys.argv[1], timeout="5s") as client:
    info = client.scheduler_info(n_workers=-1)
    print(f"workers: {len(info['workers'])}")
    print(f"dashboard: {client.dashboard_link}")
EOF
}

cmd_start() {
    local n_workers="${1:-2}" dir pid i
    is_uint "$n_workers" && ((n_workers >= 1)) || die "N_WORKERS must be a positive integer, got '$n_workers'"
    is_uint "$PORT" || die "DGLMM_LOCAL_CLUSTER_PORT must be a port number, got '$PORT'"
    is_uint "$TIMEOUT" || die "DGLMM_LOCAL_CLUSTER_TIMEOUT must be whole seconds, got '$TIMEOUT'"
    "$PYTHON" -c "import distributed" 2>/dev/null \
        || die "'$PYTHON' cannot import distributed (set PYTHON=/path/to/python)"
    dir="$(abs_state_dir)"

    pid="$(read_pid "$dir/scheduler.pid")"
    if pid_alive "$pid"; then
        die "already running (scheduler PID $pid, state dir $dir); run '$0 stop' first"
    fi
    # Leftovers of a crashed run.
    shopt -s nullglob
    local stale=("$dir"/worker-*.pid)
    ((${#stale[@]} == 0)) || stop_pidfiles "${stale[@]}"
    rm -f "$dir/scheduler.pid" "$dir/scheduler.json" "$dir/address" "$dir"/*.log

    local dashboard_args=(--dashboard-address "$DASHBOARD")
    [[ "$DASHBOARD" == none ]] && dashboard_args=(--no-dashboard)

    spawn "$dir/scheduler.pid" "$dir/scheduler.log" \
        "$PYTHON" -m dask scheduler --host "$HOST" --port "$PORT" \
        "${dashboard_args[@]}" --scheduler-file "$dir/scheduler.json"
    wait_for_pidfile "$dir/scheduler.pid" || {
        cmd_stop >/dev/null
        die "scheduler did not start; see $dir/scheduler.log"
    }

    local address="tcp://$HOST:$PORT"
    mkdir -p "$dir/work"
    for ((i = 1; i <= n_workers; i++)); do
        spawn "$dir/worker-$i.pid" "$dir/worker-$i.log" \
            "$PYTHON" -m dask worker "$address" --host "$HOST" --nworkers 1 \
            --nthreads "$THREADS" --memory-limit "$MEMORY" --name "local-worker-$i" \
            --dashboard-address "$HOST:0" --local-directory "$dir/work" \
            --death-timeout "$TIMEOUT"
        wait_for_pidfile "$dir/worker-$i.pid" || {
            cmd_stop >/dev/null
            die "worker $i did not start; see $dir/worker-$i.log"
        }
    done

    if ! "$PYTHON" - "$dir/scheduler.json" "$address" "$n_workers" "$TIMEOUT" \
        "$dir/scheduler.pid" >"$dir/ready.out" 2>"$dir/ready.err" <<'EOF'
import json, os, sys, time
from distributed import Client

scheduler_file, address, n_workers, timeout, pidfile = sys.argv[1:]
n_workers, timeout = int(n_workers), float(timeout)
deadline = time.monotonic() + timeout
# The scheduler writes its file once it listens; a dead scheduler ends the wait early.
while not os.path.exists(scheduler_file):
    pid = int(open(pidfile).read().strip())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("scheduler process exited")
    if time.monotonic() > deadline:
        sys.exit(f"no scheduler file after {timeout:g}s")
    time.sleep(0.1)
with open(scheduler_file) as f:
    listening = json.load(f)["address"]
if listening != address:
    sys.exit(f"scheduler listens on {listening}, expected {address}")
remaining = max(1.0, deadline - time.monotonic())
with Client(address, timeout=remaining) as client:
    client.wait_for_workers(n_workers, timeout=max(1.0, deadline - time.monotonic()))
    n = len(client.scheduler_info(n_workers=-1)["workers"])
    print(client.dashboard_link or "")
    print(n)
EOF
    then
        echo "local-cluster: cluster did not become ready within ${TIMEOUT}s:" >&2
        sed 's/^/  /' "$dir/ready.err" >&2 || true
        for f in "$dir"/scheduler.log "$dir"/worker-*.log; do
            echo "--- last lines of $f" >&2
            tail -n 15 "$f" >&2 || true
        done
        cmd_stop >/dev/null
        exit 1
    fi
    local dashboard n_ready
    dashboard="$(sed -n 1p "$dir/ready.out")"
    n_ready="$(sed -n 2p "$dir/ready.out")"
    rm -f "$dir/ready.out" "$dir/ready.err"
    echo "$address" >"$dir/address"

    echo "local cluster started: $n_ready worker(s), state dir $dir"
    echo "scheduler: $address"
    echo "scheduler-file: $dir/scheduler.json"
    [[ -n "$dashboard" ]] && echo "dashboard: $dashboard"
    echo "use: dglmm fit DATA ... --scheduler $address"
    echo " or: dglmm fit DATA ... --scheduler-file $dir/scheduler.json"
    echo "stop: $0 stop"
}

case "${1:-}" in
    start)
        shift
        [[ $# -le 1 ]] || { usage; exit 2; }
        cmd_start "$@"
        ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    -h | --help | help) usage ;;
    *)
        usage
        exit 2
        ;;
esac
