#!/usr/bin/env bash
# Installs what pgwarden needs on Debian 12 and is missing; fast when everything is present.
# Never starts system services (the test harness and the local cluster start their own).
set -euo pipefail

packages=(
  postgresql-15 postgresql-client-15   # the database we supervise
  etcd-server etcd-client              # the DCS (etcd v3)
  pgbackrest                           # backups, WAL archiving (agent/src/backup)
  pgbouncer                            # the controller's pooler (spec.pooler): its e2e test runs /usr/sbin/pgbouncer
  patroni python3-etcd                 # patronictl, for compatibility tests and the benchmark
  prometheus                           # promtool checks deploy/monitoring (scrape config, alert rules)
  wrk                                  # HTTP load for the benchmark's REST figures
  haproxy                              # deploy/haproxy: its e2e test and the benchmark
  protobuf-compiler libprotobuf-dev    # the etcd-client crate compiles etcd's protobufs
  build-essential pkg-config ca-certificates curl iproute2 procps
  openssl                              # the Kubernetes test harness generates its service-account key
  socat                                # TLS in front of the S3 test server (tests/src/harness/s3.rs)
  python3-venv                         # a virtualenv for moto, the S3 test server (from PyPI)
  debootstrap                          # the container images' Debian root filesystem (images/build.sh)
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  # Debian's packages would start etcd and a postgres cluster as services: forbid that while
  # installing (policy-rc.d exit 101 = "action not allowed").
  policy=/usr/sbin/policy-rc.d
  had_policy=0
  [ -e "$policy" ] && had_policy=1
  if [ "$had_policy" -eq 0 ]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
  fi
  trap '[ "$had_policy" -eq 0 ] && as_root rm -f "$policy"' EXIT
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# moto (PyPI), an S3-compatible server for the pgBackRest S3 tests, in a virtualenv of Debian's
# Python outside the repository (tests/src/harness/s3.rs expects it there).
moto_venv=/var/cache/pgwarden/moto-venv
if [ ! -x "$moto_venv/bin/moto_server" ]; then
  echo "install-deps: installing moto into $moto_venv"
  as_root mkdir -p /var/cache/pgwarden
  as_root /usr/bin/python3 -m venv "$moto_venv"
  as_root "$moto_venv/bin/pip" install -q 'moto[server]>=5.1,<6'
fi

# check_patroni (PyPI), the Nagios checks Patroni users run against the REST API; the
# pending-restart test runs it (tests/tests/operations.rs).
check_patroni_venv=/var/cache/pgwarden/check-patroni-venv
if [ ! -x "$check_patroni_venv/bin/check_patroni" ]; then
  echo "install-deps: installing check_patroni into $check_patroni_venv"
  as_root mkdir -p /var/cache/pgwarden
  as_root /usr/bin/python3 -m venv "$check_patroni_venv"
  as_root "$check_patroni_venv/bin/pip" install -q 'check_patroni>=2.2,<3'
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "install-deps: cargo not found; installing Debian's Rust toolchain" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cargo rustc
  fi
fi
echo "install-deps: ok ($(cargo --version))"
