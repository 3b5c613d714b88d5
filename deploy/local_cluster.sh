#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine, every node on 127.0.0.1.
#
#   deploy/local_cluster.sh start [--workers N] [--head-cpus C] [--worker-cpus C]
#                                 [--object-store-mb M] [--no-auth]
#   deploy/local_cluster.sh status      # nodes, their processes, `ray status`
#   deploy/local_cluster.sh env         # the exports a client on this machine needs
#   deploy/local_cluster.sh stop        # stops THIS cluster only (never a bare `ray stop`)
#
# One head node (GCS, dashboard/job server, raylet) and N worker nodes (raylets), each a
# separate `ray start` with its own fixed ports, so the cluster does not collide with a
# default `ray.init()` or `ray start` on the same machine:
#
#   GCS 127.0.0.1:6390, dashboard/jobs http://127.0.0.1:8270, Ray client 6391;
#   node i (head = 0): node manager 6400+10i, object manager +1, dashboard agent +2 (HTTP)
#   and +3 (gRPC), metrics export (Prometheus) +4, runtime-env agent +5;
#   worker processes 20000+200i .. 20000+200i+199.
#
# Everything lives under $MPN_CLUSTER_DIR (default /tmp/mpn-dqn-cluster): one Ray temp dir per
# node (`--temp-dir` ray/head, ray/worker1, ...: sessions, logs, unpacked working dirs - as on
# separate machines; a shared one would let one node's runtime-env agent delete a job's
# working dir that another node still uses), one log and one session-id file per node
# (nodes/), the auth token and cluster.env.  (`ray start --storage` no longer exists in 2.60.)
#
# Loopback: `ray start --node-ip-address 127.0.0.1` would register nodes under the machine's
# routable IP; deploy/ray_loopback.py keeps 127.0.0.1 (see its docstring).  Clients on this
# machine need RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for the same reason (`env` prints it).
#
# Stopping: each node is started in its own session (setsid); `stop` sends SIGTERM, then
# SIGKILL after a grace period, to exactly the processes of the recorded sessions: GCS,
# raylets, agents, dashboard, Ray workers and the drivers of submitted jobs.  Other Ray
# instances on the machine (a test's ray.init(), someone's `ray start`) are not touched.
#
# Token authentication (Ray 2.60 enables it by default for new local clusters): the nodes
# start with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=$MPN_CLUSTER_DIR/auth_token, a random
# 256-bit token generated on first start (file mode 600; set RAY_AUTH_TOKEN_PATH before
# `start` to use your own file).  Every client - `ray job submit`, `ray status`,
# `python main.py train-neurogym --address ...` - needs RAY_AUTH_MODE=token and the same token
# (an explicit --address never turns token auth on by itself), so run
#     eval "$(deploy/local_cluster.sh env)"
# first.  Jobs submitted to the cluster inherit the variables from the nodes.  --no-auth
# starts the cluster with RAY_AUTH_MODE=disabled (anyone who can reach the ports can run code).
#
# Environment: MPN_CLUSTER_DIR, MPN_CLUSTER_GCS_PORT, MPN_CLUSTER_DASHBOARD_PORT,
# MPN_CLUSTER_PORT_BASE (6400), MPN_CLUSTER_WORKER_PORT_BASE (20000), PYTHON (python).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
DIR="${MPN_CLUSTER_DIR:-/tmp/mpn-dqn-cluster}"
GCS_PORT="${MPN_CLUSTER_GCS_PORT:-6390}"
DASH_PORT="${MPN_CLUSTER_DASHBOARD_PORT:-8270}"
CLIENT_PORT=$((GCS_PORT + 1))
PORT_BASE="${MPN_CLUSTER_PORT_BASE:-6400}"
WORKER_PORT_BASE="${MPN_CLUSTER_WORKER_PORT_BASE:-20000}"
NODES="$DIR/nodes"
GRACE_S=4

usage() {
  sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
}

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

# pids of the live (not zombie) processes in session $1 (the node's `ray start` wrapper made
# that session)
session_pids() {
  local sid="$1"
  [[ "$sid" =~ ^[0-9]+$ ]] && (( sid > 1 )) || return 0
  ps -eo pid=,sid=,stat= | awk -v s="$sid" '$2 == s && $3 !~ /^Z/ { print $1 }'
}

node_sids() {     # "name sid" per recorded node, workers first, head last
  local f
  for f in "$NODES"/worker*.sid "$NODES"/head.sid; do
    [[ -f "$f" ]] || continue
    echo "$(basename "$f" .sid) $(tr -dc '0-9' < "$f")"
  done
}

running() {       # true if any recorded node still has processes
  local name sid
  while read -r name sid; do
    [[ -n "$(session_pids "$sid")" ]] && return 0
  done < <(node_sids)
  return 1
}

write_env() {     # the exports a client on this machine needs
  {
    echo "# deploy/local_cluster.sh: Ray cluster at 127.0.0.1:$GCS_PORT (dashboard/jobs http://127.0.0.1:$DASH_PORT)"
    echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
    echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASH_PORT"
    echo "export MPN_CLUSTER_ADDRESS=127.0.0.1:$GCS_PORT"
    if [[ "$AUTH" == token ]]; then
      echo "export RAY_AUTH_MODE=token"
      echo "export RAY_AUTH_TOKEN_PATH=$TOKEN_PATH"
    else
      echo "export RAY_AUTH_MODE=disabled"
    fi
  } > "$DIR/cluster.env"
}

node_ports() {    # args for node index $1
  local i="$1" b=$((PORT_BASE + 10 * $1)) w=$((WORKER_PORT_BASE + 200 * $1))
  echo "--node-manager-port $b --object-manager-port $((b + 1))" \
       "--dashboard-agent-listen-port $((b + 2)) --dashboard-agent-grpc-port $((b + 3))" \
       "--metrics-export-port $((b + 4)) --runtime-env-agent-port $((b + 5))" \
       "--min-worker-port $w --max-worker-port $((w + 199))"
}

start_node() {    # name, then ray start args
  local name="$1"; shift
  if ! "$PYTHON" "$ROOT/deploy/ray_loopback.py" --sid-file "$NODES/$name.sid" "$@" \
        > "$NODES/$name.log" 2>&1; then
    echo "local_cluster.sh: starting $name failed; the end of $NODES/$name.log:" >&2
    tail -n 15 "$NODES/$name.log" >&2
    cmd_stop >&2 || true
    exit 1
  fi
}

wait_nodes() {    # until the GCS reports $1 alive nodes (at most 90 s)
  local want="$1" have=0 t
  # shellcheck disable=SC1091
  set -a; source "$DIR/cluster.env"; set +a
  for ((t = 0; t < 30; t++)); do
    have=$(timeout 30 ray status --address "127.0.0.1:$GCS_PORT" 2>/dev/null \
           | grep -cE '^ *[0-9]+ node_[0-9a-f]+' || true)
    (( have >= want )) && return 0
    sleep 2
  done
  echo "local_cluster.sh: only $have of $want nodes joined; see $NODES/*.log" >&2
  cmd_stop >&2 || true
  exit 1
}

cmd_start() {
  local workers=1 head_cpus=1 worker_cpus=1 store_mb=256
  AUTH=token
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --workers) workers="$2"; shift 2 ;;
      --head-cpus) head_cpus="$2"; shift 2 ;;
      --worker-cpus) worker_cpus="$2"; shift 2 ;;
      --object-store-mb) store_mb="$2"; shift 2 ;;
      --no-auth) AUTH=disabled; shift ;;
      -h|--help) usage ;;
      *) echo "local_cluster.sh start: unknown option $1" >&2; usage ;;
    esac
  done
  [[ "$workers" =~ ^[0-9]+$ ]] || die "--workers must be a whole number, got $workers"
  mkdir -p "$DIR"
  if running; then
    die "a cluster is already running from $DIR (deploy/local_cluster.sh stop first)"
  fi
  rm -rf "$DIR/ray" "$NODES"
  mkdir -p "$NODES" "$DIR/ray"
  unset RAY_ADDRESS RAY_AUTH_TOKEN
  if [[ "$AUTH" == token ]]; then
    TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$DIR/auth_token}"
    if [[ ! -s "$TOKEN_PATH" ]]; then
      (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$TOKEN_PATH")
    fi
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_PATH"
  else
    export RAY_AUTH_MODE=disabled
    unset RAY_AUTH_TOKEN_PATH
  fi
  export MPN_LOCAL_CLUSTER="$DIR"
  local store=$((store_mb * 1024 * 1024))
  local common=(--node-ip-address 127.0.0.1 --object-store-memory "$store" --disable-usage-stats)
  echo "Starting head node: GCS 127.0.0.1:$GCS_PORT, dashboard http://127.0.0.1:$DASH_PORT, $head_cpus CPU"
  # shellcheck disable=SC2046
  start_node head --head --port "$GCS_PORT" --ray-client-server-port "$CLIENT_PORT" \
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" \
    --num-cpus "$head_cpus" --temp-dir "$DIR/ray/head" "${common[@]}" $(node_ports 0)
  local k
  for ((k = 1; k <= workers; k++)); do
    echo "Starting worker node $k: $worker_cpus CPU, node manager port $((PORT_BASE + 10 * k))"
    # shellcheck disable=SC2046
    start_node "worker$k" --address "127.0.0.1:$GCS_PORT" --num-cpus "$worker_cpus" \
      --temp-dir "$DIR/ray/worker$k" "${common[@]}" $(node_ports "$k")
  done
  write_env
  wait_nodes $((workers + 1))
  echo "Cluster up: 1 head + $workers worker node(s) on 127.0.0.1 (auth: $AUTH; state in $DIR)."
  echo "Clients on this machine:  eval \"\$(deploy/local_cluster.sh env)\""
  echo "  python main.py train-neurogym --address 127.0.0.1:$GCS_PORT --num-actors N ..."
  echo "  ray job submit --address http://127.0.0.1:$DASH_PORT --working-dir . -- python main.py train-neurogym ..."
}

cmd_stop() {
  if [[ ! -d "$NODES" ]]; then
    echo "No cluster recorded in $DIR."
    return 0
  fi
  local name sid pids all=()
  while read -r name sid; do
    pids=$(session_pids "$sid")
    [[ -z "$pids" ]] && continue
    echo "Stopping $name (session $sid: $(echo "$pids" | wc -w) processes)"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    all+=("$sid")
  done < <(node_sids)
  local t=0 left
  while (( ${#all[@]} )) && (( t < GRACE_S * 2 )); do
    left=""
    for sid in "${all[@]}"; do left+="$(session_pids "$sid")"; done
    [[ -z "$left" ]] && break
    sleep 0.5; t=$((t + 1))
  done
  for sid in "${all[@]}"; do
    pids=$(session_pids "$sid")
    if [[ -n "$pids" ]]; then
      echo "Killing what is left of session $sid after ${GRACE_S}s"
      # shellcheck disable=SC2086
      kill -KILL $pids 2>/dev/null || true
    fi
  done
  t=0
  while (( t < 20 )); do          # until the kernel has taken them down
    left=""
    for sid in "${all[@]}"; do left+="$(session_pids "$sid")"; done
    [[ -z "$left" ]] && break
    sleep 0.5; t=$((t + 1))
  done
  [[ -z "${left:-}" ]] || echo "local_cluster.sh: processes still alive after SIGKILL: $left" >&2
  rm -f "$NODES"/*.sid "$DIR/cluster.env"
  echo "Stopped (logs kept in $NODES and $DIR/ray)."
}

cmd_status() {
  if [[ ! -d "$NODES" ]] || ! running; then
    echo "No cluster running from $DIR."
    return 3
  fi
  local name sid n
  while read -r name sid; do
    n=$(session_pids "$sid" | wc -l)
    printf '%-8s session %-8s %3d processes %s\n' "$name" "$sid" "$n" "$([[ $n -gt 0 ]] && echo up || echo DOWN)"
  done < <(node_sids)
  # shellcheck disable=SC1091
  set -a; source "$DIR/cluster.env"; set +a
  timeout 60 ray status --address "127.0.0.1:$GCS_PORT" || true
}

cmd_env() {
  [[ -f "$DIR/cluster.env" ]] || { echo "No cluster running from $DIR." >&2; return 3; }
  cat "$DIR/cluster.env"
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) usage ;;
esac
