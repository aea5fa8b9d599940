#!/usr/bin/env bash
# Release binaries for images and the benchmark: `pgwarden`, `pgwarden-bench`, `pgwarden-controller`
# and a statically linked `pgwarden-fence-guard`. The guard stays resident next to every agent;
# static, it maps only the few pages of libc it uses (≈1 MiB RSS instead of ≈2 MiB, most of which
# was libc.so's). Only the guard: the agent resolves host names through glibc's NSS, which a
# static glibc cannot load safely.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p pgwarden -p pgwarden-bench -p pgwarden-controller
# `cargo rustc` passes the flag to this one binary only (proc macros and build scripts cannot
# be linked statically, so it cannot go into RUSTFLAGS).
cargo rustc --release --locked -p pgwarden --bin pgwarden-fence-guard -- -C target-feature=+crt-static
target="${CARGO_TARGET_DIR:-target}/release"
if ! ldd "$target/pgwarden-fence-guard" 2>&1 | grep -q "statically linked"; then
  echo "build-release: $target/pgwarden-fence-guard is not statically linked" >&2
  exit 1
fi
echo "build-release: binaries in $target"
