#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what is missing, builds,
# checks formatting and lints, runs unit and end-to-end tests (real etcd, PostgreSQL 15 and
# agents; see tests/).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# kube-apiserver and kube-controller-manager v1.20 for the Kubernetes-mode tests: built once from
# Debian's source package (~8 minutes), cached in /var/cache/pgwarden/kubernetes-1.20/bin.
scripts/build-kube.sh
# PostgreSQL 17 for the major-version upgrade tests (15 -> 17): trixie's packages unpacked into
# /var/cache/pgwarden/postgresql-17 (~20 s once; scripts/build-postgres17.sh says why not a build).
scripts/build-postgres17.sh
export PATH="$HOME/.cargo/bin:$PATH"

cargo build --workspace --all-targets --locked
# The end-to-end tests run these binaries; without the variables the harness builds them with
# `cargo build -p …`, whose feature set differs from the workspace's and costs a rebuild.
export PGWARDEN_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/pgwarden"
export PGWARDEN_CONTROLLER_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/pgwarden-controller"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The benchmark's quick mode (one repetition, short windows) as a smoke test that it still
# works; its figures are not asserted. Before the tests so cargo's summary stays last.
cargo run --locked -p pgwarden-bench -- --quick --out target/bench-quick
cargo test --workspace --locked
