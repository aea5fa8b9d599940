#!/usr/bin/env bash
# Checks pgwarden/instance:latest-pg17 (`images/build.sh --with-postgres17`) for real, in about
# half a minute: the 17 binaries run; an initdb 17 (checksums, ICU) starts and loads its modules
# (pgcrypto/libcrypto, pg_stat_statements, plpgsql, snowball, time zones) and serves a
# pg_basebackup; pg_upgrade --check and --link of a 15 cluster keep its rows; pgBackRest is
# trixie's 2.55 and backs up, archives and restores 17 and 15 (posix repository); and one member
# (agent + etcd containers) made on 15 is upgraded with `pgwarden upgrade-data-dir` and leads
# again on 17 with its rows.
#
#   scripts/check-image-postgres17.sh [IMAGE]
set -euo pipefail

image=${1:-pgwarden/instance:latest-pg17}
log() { echo "check-image-postgres17: $*" >&2; }
run() { docker run --rm -i --entrypoint bash "$image" -s; }

for b in postgres initdb pg_ctl pg_upgrade pg_controldata pg_basebackup pg_rewind pg_dump psql; do
  docker run --rm --entrypoint "/usr/lib/postgresql/17/bin/$b" "$image" --version >/dev/null
done
docker run --rm --entrypoint /usr/local/bin/pgwarden "$image" upgrade-data-dir --help >/dev/null
log "binaries run: $(docker run --rm --entrypoint /usr/lib/postgresql/17/bin/postgres "$image" --version)"

run <<'CHECK'
set -euo pipefail
B=/usr/lib/postgresql/17/bin
$B/initdb -D /tmp/d -U postgres --data-checksums --encoding UTF8 --locale C.UTF-8 \
  --locale-provider icu --icu-locale en-US >/dev/null 2>&1
$B/pg_ctl -D /tmp/d -o "-k /tmp -c listen_addresses= -c shared_preload_libraries=pg_stat_statements" \
  -l /tmp/log -w start >/dev/null
out=$($B/psql -h /tmp -U postgres -At -v ON_ERROR_STOP=1 <<'SQL'
create extension pgcrypto;
create extension pg_stat_statements;
select encode(digest('x', 'sha256'), 'hex');
select 'a' < 'B' collate "en-US-x-icu";
do $$ begin perform 1; end $$;
set timezone = 'Europe/Paris';
select '2024-07-01 12:00+00'::timestamptz::text;
select to_tsvector('english', 'foxes');
select pg_jit_available();
SQL
)
expected='CREATE EXTENSION
CREATE EXTENSION
2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881
t
DO
SET
2024-07-01 14:00:00+02
'"'"'fox'"'"':1
f'
[ "$out" = "$expected" ] || { echo "unexpected output:"; echo "$out"; exit 1; } >&2
$B/pg_basebackup -h /tmp -U postgres -D /tmp/copy -X stream -c fast
[ "$(cat /tmp/copy/PG_VERSION)" = 17 ]
$B/pg_ctl -D /tmp/d -w stop >/dev/null
! grep -E "ERROR|FATAL|WARNING" /tmp/log
CHECK
log "initdb 17, server, modules, pg_basebackup: ok (JIT unavailable)"

run <<'CHECK'
set -euo pipefail
O=/usr/lib/postgresql/15/bin N=/usr/lib/postgresql/17/bin
sum="select count(*), md5(string_agg(m, ',' order by g)) from t"
$O/initdb -D /tmp/d15 -U postgres --data-checksums --encoding UTF8 --locale C.UTF-8 >/dev/null 2>&1
$O/pg_ctl -D /tmp/d15 -o "-k /tmp -c listen_addresses=" -l /tmp/log15 -w start >/dev/null
$O/psql -h /tmp -U postgres -Atq -v ON_ERROR_STOP=1 \
  -c "create table t as select g, md5(g::text) m from generate_series(1, 20000) g" -c "create index on t (m)"
before=$($O/psql -h /tmp -U postgres -At -c "$sum")
$O/pg_ctl -D /tmp/d15 -w stop >/dev/null
$N/initdb -D /tmp/d17 -U postgres --data-checksums --encoding UTF8 --locale C.UTF-8 >/dev/null 2>&1
mkdir /tmp/up && cd /tmp/up
$N/pg_upgrade -b $O -B $N -d /tmp/d15 -D /tmp/d17 -U postgres --socketdir=/tmp --check >/dev/null
$N/pg_upgrade -b $O -B $N -d /tmp/d15 -D /tmp/d17 -U postgres --socketdir=/tmp --link >/dev/null
$N/pg_ctl -D /tmp/d17 -o "-k /tmp -c listen_addresses=" -l /tmp/log17 -w start >/dev/null
after=$($N/psql -h /tmp -U postgres -At -c "$sum")
[ "$before" = "$after" ] || { echo "rows differ: $before / $after" >&2; exit 1; }
$N/pg_ctl -D /tmp/d17 -w stop >/dev/null
CHECK
log "pg_upgrade --check and --link 15 -> 17: ok, rows equal"

# pgBackRest: trixie's 2.55 is the image's only one (bookworm's 2.45 does not support 17). For
# each server version a real round trip against a posix repository in /tmp: stanza-create,
# archive-push (pgbackrest check), a full backup, then a restore of it that replays the archive
# (restore_command = archive-get) up to rows written after the backup.
run <<'CHECK'
set -euo pipefail
for p in pgbackrest /usr/bin/pgbackrest; do
  v=$($p version)
  [[ $v == "pgBackRest 2.55."* ]] || { echo "$p version: $v" >&2; exit 1; }
done
for ver in 17 15; do
  B=/usr/lib/postgresql/$ver/bin d=/tmp/pg$ver r=/tmp/restore$ver conf=/tmp/pgbackrest$ver.conf
  cat >"$conf" <<CONF
[global]
repo1-path=/tmp/repo$ver
repo1-retention-full=1
lock-path=/tmp/pgbackrest-lock$ver
log-level-console=warn
log-level-file=off
start-fast=y

[main]
pg1-path=$d
pg1-socket-path=/tmp
pg1-port=54$ver
CONF
  $B/initdb -D $d -U postgres --data-checksums --encoding UTF8 --locale C.UTF-8 >/dev/null 2>&1
  $B/pg_ctl -D $d -o "-k /tmp -p 54$ver -c listen_addresses= -c archive_mode=on \
    -c wal_level=replica -c archive_command='pgbackrest --config=$conf --stanza=main archive-push %p'" \
    -l /tmp/log$ver -w start >/dev/null
  sql() { $B/psql -h /tmp -p 54$ver -U postgres -Atq -v ON_ERROR_STOP=1 "$@"; }
  sql -c "create table t as select g from generate_series(1, 1000) g"
  pgbackrest --config="$conf" --stanza=main stanza-create
  pgbackrest --config="$conf" --stanza=main check
  pgbackrest --config="$conf" --stanza=main --type=full backup
  sql -c "insert into t select g from generate_series(1001, 2000) g" -c "select pg_switch_wal()" >/dev/null
  pgbackrest --config="$conf" --stanza=main check
  info=$(pgbackrest --config="$conf" --stanza=main --output=json info)
  [[ $info == *'"status":{"code":0'* && $info == *'"type":"full"'* ]] \
    || { echo "pgbackrest info ($ver): $info" >&2; exit 1; }
  [ "$(ls /tmp/repo$ver/archive/main/$ver-1/*/ | wc -l)" -ge 2 ] \
    || { echo "no WAL archived ($ver)" >&2; exit 1; }
  $B/pg_ctl -D $d -w stop >/dev/null
  ! grep -E "ERROR|FATAL" /tmp/log$ver || { echo "server log ($ver) has errors" >&2; exit 1; }
  pgbackrest --config="$conf" --stanza=main --pg1-path=$r --type=default restore
  $B/pg_ctl -D $r -o "-k /tmp -p 54$ver -c listen_addresses= -c archive_mode=off" \
    -l /tmp/logr$ver -w start >/dev/null
  for _ in $(seq 60); do [ "$(sql -c 'select pg_is_in_recovery()')" = f ] && break; sleep 0.5; done
  n=$(sql -c "select count(*) from t")
  [ "$n" = 2000 ] || { echo "restored $ver has $n rows, not 2000" >&2; exit 1; }
  $B/pg_ctl -D $r -w stop >/dev/null
  echo "$ver: $($B/postgres --version | cut -d' ' -f3), $(du -sh /tmp/repo$ver | cut -f1) repo" >&2
done
CHECK
log "pgBackRest $(docker run --rm --entrypoint pgbackrest "$image" version | cut -d' ' -f2) (PATH and /usr/bin): stanza-create, archive-push (check), full backup, restore + WAL replay against 17 and 15: ok"

# One member: made on 15 by the image's own configuration, upgraded by the agent's command, then
# run by the agent on 17 (postgresql.bin_dirs chooses by PG_VERSION).
tag=pg17check-$$
net=$tag vol=$tag cfg=$(mktemp)
cleanup() {
  docker rm -f "$tag-etcd" "$tag-m1" >/dev/null 2>&1 || true
  docker volume rm "$vol" >/dev/null 2>&1 || true
  docker network rm "$net" >/dev/null 2>&1 || true
  rm -f "$cfg"
}
trap cleanup EXIT
docker network create "$net" >/dev/null
docker volume create "$vol" >/dev/null
docker run -d --name "$tag-etcd" --network "$net" --network-alias etcd pgwarden/etcd:latest >/dev/null
docker run --rm --entrypoint cat "$image" /etc/pgwarden/pgwarden.yml >"$cfg"
sed -i 's|^postgresql:|postgresql:\n  bin_dirs:\n    15: /usr/lib/postgresql/15/bin\n    17: /usr/lib/postgresql/17/bin|' "$cfg"
chmod 0644 "$cfg"
member=(--hostname m1 --network "$net" --stop-timeout 60 -v "$vol:/var/lib/pgwarden"
  -e PGWARDEN_NAME=m1 -e PGWARDEN_RESTAPI_CONNECT_ADDRESS=m1:8008
  -e PGWARDEN_POSTGRESQL_CONNECT_ADDRESS=m1:5432 -e PGWARDEN_SUPERUSER_PASSWORD=su-secret
  -e PGWARDEN_REPLICATION_PASSWORD=r-secret -e PGWARDEN_REWIND_PASSWORD=w-secret)
sql() { docker exec "$tag-m1" psql -h /var/run/postgresql -U postgres -At -c "$1"; }
wait_primary() {
  local _
  for _ in $(seq 120); do
    [ "$(sql 'select pg_is_in_recovery()' 2>/dev/null)" = f ] && return 0
    sleep 1
  done
  docker logs --tail 40 "$tag-m1" >&2
  log "the member did not become a writable leader"
  return 1
}
sum="select count(*), md5(string_agg(m, ',' order by g)) from t"
docker run -d --name "$tag-m1" "${member[@]}" "$image" >/dev/null
wait_primary
sql "create table t as select g, md5(g::text) m from generate_series(1, 20000) g" >/dev/null
before=$(sql "$sum")
[ "$(sql 'show server_version_num')" -lt 160000 ]
docker stop "$tag-m1" >/dev/null
docker rm "$tag-m1" >/dev/null
docker run --rm "${member[@]}" -v "$cfg:/etc/pgwarden/pgwarden.yml:ro" \
  --entrypoint /usr/local/bin/pgwarden "$image" upgrade-data-dir /etc/pgwarden/pgwarden.yml >&2
docker run -d --name "$tag-m1" "${member[@]}" -v "$cfg:/etc/pgwarden/pgwarden.yml:ro" "$image" >/dev/null
wait_primary
after=$(sql "$sum")
[ "$(sql 'show server_version_num')" -ge 170000 ] || { log "not on 17 after the upgrade"; exit 1; }
[ "$before" = "$after" ] || { log "rows differ: $before / $after"; exit 1; }
sql "insert into t values (20001, 'x')" >/dev/null
log "agent member 15 -> 17 with pgwarden upgrade-data-dir: ok, rows equal, writable"
log "all checks passed for $image"
