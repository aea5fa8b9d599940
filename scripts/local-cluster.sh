#!/usr/bin/env bash
# Starts a local pgwarden cluster on loopback: one etcd and N members (default 3), each with its
# own PostgreSQL 15, and stays in the foreground until Ctrl-C, then stops everything by PID.
#
#   scripts/local-cluster.sh [--members N] [--dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

members=3
dir="$root/.local-cluster"
while [ $# -gt 0 ]; do
  case "$1" in
    --members) members="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p pgwarden --bin pgwarden

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
# postgres refuses to run as root: run the agents as the postgres user, from a copy of the
# binary it can execute.
run_as=()
if [ "$(id -u)" -eq 0 ]; then
  run_as=(runuser -u postgres --)
fi
install -m 0755 target/release/pgwarden "$dir/pgwarden"
pg_bin=/usr/lib/postgresql/15/bin

pids=()
cleanup() {
  echo
  echo "stopping members (SIGTERM, then waiting for a clean stop)..."
  for pid in "${pids[@]:1}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]:1}"; do wait "$pid" 2>/dev/null || true; done
  kill -TERM "${pids[0]}" 2>/dev/null || true
  wait "${pids[0]}" 2>/dev/null || true
  echo "stopped. Data and logs stay in $dir (delete it to start afresh)."
}
trap cleanup EXIT INT TERM

etcd_port=2379
etcd --name local --data-dir "$dir/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster local=http://127.0.0.1:2380 --log-level warn --logger zap >"$dir/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  etcdctl --endpoints "127.0.0.1:$etcd_port" endpoint health >/dev/null 2>&1 && break
  sleep 0.1
done

cat >"$dir/patronictl.yml" <<YAML
scope: local
namespace: /service/
etcd3:
  hosts: ['127.0.0.1:$etcd_port']
YAML

for i in $(seq 0 $((members - 1))); do
  name="pg$i"
  mkdir -p "$dir/$name"
  cat >"$dir/$name/config.yml" <<YAML
scope: local
namespace: /service/
name: $name
restapi:
  listen: 127.0.0.1:$((8008 + i))
  connect_address: 127.0.0.1:$((8008 + i))
etcd3:
  hosts: ['127.0.0.1:$etcd_port']
bootstrap:
  dcs:
    ttl: 30
    loop_wait: 10
    retry_timeout: 10
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
  initdb:
    - encoding: UTF8
    - data-checksums
postgresql:
  listen: 127.0.0.1:$((5432 + i))
  connect_address: 127.0.0.1:$((5432 + i))
  data_dir: $dir/$name/data
  bin_dir: $pg_bin
  parameters:
    unix_socket_directories: $dir/$name
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 scram-sha-256
    - host replication replicator 127.0.0.1/32 scram-sha-256
  authentication:
    superuser: {username: postgres, password: postgres}
    replication: {username: replicator, password: replicator}
YAML
  [ "$(id -u)" -eq 0 ] && chown -R postgres:postgres "$dir/$name"
  "${run_as[@]}" "$dir/pgwarden" "$dir/$name/config.yml" >>"$dir/$name/agent.log" 2>&1 &
  pids+=($!)
done

echo "waiting for the cluster to come up..."
for _ in $(seq 300); do
  up=0
  for i in $(seq 0 $((members - 1))); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$((8008 + i))/health" || true)
    [ "$code" = 200 ] && up=$((up + 1))
  done
  [ "$up" -eq "$members" ] && break
  sleep 0.2
done

cat <<TXT

pgwarden local cluster "local" is running ($members members, etcd on 127.0.0.1:$etcd_port).
  state dir:   $dir   (agent logs: $dir/pgN/agent.log)
  list:        $dir/pgwarden -c $dir/patronictl.yml list     (or: patronictl -c $dir/patronictl.yml list)
  switchover:  $dir/pgwarden -c $dir/patronictl.yml switchover --candidate pg1
  primary:     psql "host=127.0.0.1 port=5432 user=postgres password=postgres"   (port 5432+N for pgN)
  REST API:    curl http://127.0.0.1:8008/patroni     (8008+N for pgN; /primary, /replica, /metrics, ...)
Press Ctrl-C to stop.
TXT
"$dir/pgwarden" -c "$dir/patronictl.yml" list || true
wait "${pids[0]}"
