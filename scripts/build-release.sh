#!/usr/bin/env bash
# Release binaries for images and the benchmark: `pgwarden`, `pgwarden-bench`, `pgwarden-controller`
# and statically linked `pgwarden-fence-guard` and `pgwarden-init`. The guard stays resident next to
# every agent, and the init (the container's PID 1) next to every containerised one; static, they
# map only the few pages of libc they use (the guard: ≈1 MiB RSS instead of ≈2 MiB, most of which
# was libc.so's). Not the agent: it resolves host names through glibc's NSS, which a static glibc
# cannot load safely.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p pgwarden -p pgwarden-bench -p pgwarden-controller
target="${CARGO_TARGET_DIR:-target}/release"
# `cargo rustc` passes the flag to one binary only (proc macros and build scripts cannot be
# linked statically, so it cannot go into RUSTFLAGS).
for bin in pgwarden-fence-guard pgwarden-init; do
  cargo rustc --release --locked -p pgwarden --bin "$bin" -- -C target-feature=+crt-static
  if ! ldd "$target/$bin" 2>&1 | grep -q "statically linked"; then
    echo "build-release: $target/$bin is not statically linked" >&2
    exit 1
  fi
done
echo "build-release: binaries in $target"
