#!/usr/bin/env bash
# Builds pgwarden's container images with no registry: the base image is made here from a Debian
# 12 root filesystem (debootstrap, then `docker import`), so no `docker pull` is ever needed.
#
#   images/build.sh [--release|--debug] [--no-cargo] [--base-only] [instance|controller|etcd]...
#
# --no-cargo uses binaries already built (from $PGWARDEN_BIN_DIR if set, else target/<profile>);
# naming images builds only those (the tests build instance and etcd).
#
# Images: pgwarden/base:<hash>, pgwarden/instance:latest, pgwarden/controller:latest,
# pgwarden/etcd:latest. <hash> covers images/base/rootfs.sh (the package list and how the root
# filesystem is made), so changing it makes a new base; the root filesystem tarball is cached in $PGWARDEN_IMAGE_CACHE
# (/var/cache/pgwarden/images) so a rebuild, or a fresh clone on this machine, skips debootstrap.
# The other images are ordinary `docker build`s whose layers Docker caches.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${PGWARDEN_IMAGE_CACHE:-/var/cache/pgwarden/images}
mirror=${PGWARDEN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
profile=release
cargo_build=1
base_only=0
images=()
usage="usage: $0 [--release|--debug] [--no-cargo] [--base-only] [instance|controller|etcd]..."
for arg in "$@"; do
  case "$arg" in
    --release) profile=release ;;
    --debug) profile=debug ;;
    --no-cargo) cargo_build=0 ;;
    --base-only) base_only=1 ;;
    instance|controller|etcd) images+=("$arg") ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
[ ${#images[@]} -gt 0 ] || images=(instance controller etcd)
want() { [[ " ${images[*]} " == *" $1 "* ]]; }

log() { echo "images/build.sh: $*" >&2; }

# The base image is named after its recipe, so editing this script does not rebuild it.
hash=$(sha256sum "$here/base/rootfs.sh" | cut -c1-12)
base="pgwarden/base:$hash"
tarball="$cache/base-$hash.tar"

mkdir -p "$cache"
# Two builds at once (two test processes) would debootstrap twice and race on the tags.
exec 9>"$cache/build.lock"
flock 9
if docker image inspect "$base" >/dev/null 2>&1; then
  log "base image $base present"
else
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || { log "debootstrap is missing (scripts/install-deps.sh installs it)"; exit 1; }
    "$here/base/rootfs.sh" "$tarball" "$mirror"
    # Root filesystems of older recipes are not needed any more.
    find "$cache" -maxdepth 1 -name 'base-*.tar*' ! -name "base-$hash.tar*" -delete
  else
    log "using the cached root filesystem $tarball"
  fi
  log "docker import $tarball as $base"
  docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' "$tarball" "$base" >/dev/null
fi

[ "$base_only" -eq 1 ] && { echo "$base"; exit 0; }

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
if [ "$cargo_build" -eq 1 ]; then
  flag=(); [ "$profile" = release ] && flag=(--release)
  log "cargo build ${flag[*]}"
  if [ "$profile" = release ]; then
    # The same release binaries as the benchmark's (statically linked fence guard and init).
    "$repo/scripts/build-release.sh"
  else
    if want instance; then (cd "$repo" && cargo build "${flag[@]}" -p pgwarden --bins); fi
    if want controller; then (cd "$repo" && cargo build "${flag[@]}" -p pgwarden-controller --bin pgwarden-controller); fi
  fi
fi
bin=${PGWARDEN_BIN_DIR:-$CARGO_TARGET_DIR/$profile}

# Each image is built from a small context of its own (the Containerfile, its files and the
# binaries), never the repository: sending target/ to the daemon would take minutes.
build_image() {
  local name=$1; shift
  local ctx b
  ctx=$(mktemp -d)
  cp -a "$here/$name/." "$ctx/"
  for b in "$@"; do
    [ -x "$bin/$b" ] || { log "missing $bin/$b (build it, or run without --no-cargo)"; rm -rf "$ctx"; return 1; }
    # Debug information is most of a debug binary; the symbols stay for backtraces.
    if command -v strip >/dev/null; then strip --strip-debug -o "$ctx/$b" "$bin/$b"; else cp "$bin/$b" "$ctx/$b"; fi
  done
  # The legacy builder: BuildKit would want to pull its frontend, and this engine has no registry.
  # Its output (and its deprecation notice) is shown only when the build fails.
  local out old_id new_id
  old_id=$(docker image inspect -f '{{.Id}}' "pgwarden/$name:latest" 2>/dev/null || true)
  if ! out=$(DOCKER_BUILDKIT=0 docker build -q -f "$ctx/Containerfile" --build-arg "BASE=$base" \
    -t "pgwarden/$name:latest" "$ctx" 2>&1); then
    echo "$out" >&2
    rm -rf "$ctx"
    return 1
  fi
  rm -rf "$ctx"
  # The image this tag named before (new binaries) is left untagged; remove it by its ID unless
  # a container still uses it, so repeated test runs do not fill the disk.
  new_id=$(docker image inspect -f '{{.Id}}' "pgwarden/$name:latest")
  if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    docker rmi "$old_id" >/dev/null 2>&1 || true
  fi
  log "built pgwarden/$name:latest"
}
if want instance; then build_image instance pgwarden pgwarden-fence-guard pgwarden-init; fi
if want controller; then build_image controller pgwarden-controller; fi
if want etcd; then build_image etcd; fi
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^pgwarden/' >&2
