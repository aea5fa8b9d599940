#!/usr/bin/env bash
# Builds pgwarden's container images with no registry: the base image is made here from a Debian
# 12 root filesystem (debootstrap, then `docker import`), so no `docker pull` is ever needed.
#
#   images/build.sh [--release|--debug] [--no-cargo] [--base-only] [--with-postgres17]
#                   [instance|controller|etcd]...
#
# --no-cargo uses binaries already built (from $PGWARDEN_BIN_DIR if set, else target/<profile>);
# naming images builds only those (the tests build instance and etcd).
#
# --with-postgres17 (opt-in; it implies `instance`) also builds
# pgwarden/instance:latest-pg17: pgwarden/instance:latest plus PostgreSQL 17 in Debian's places
# (/usr/lib/postgresql/17/{bin,lib}, /usr/share/postgresql/17), for major-version upgrades
# (docs/upgrade.md). The 17 binaries are trixie's, from scripts/build-postgres17.sh's tree (run
# here when missing), relinked to trixie's loader and the libraries they need, copied to
# /usr/lib/postgresql/17/trixie-lib; no JIT (llvmjit is left out). It also replaces bookworm's
# /usr/bin/pgbackrest (2.45, which does not support 17) with trixie's (2.55), relinked the same
# way. pgwarden/instance:latest stays as without the option.
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
with_pg17=0
images=()
usage="usage: $0 [--release|--debug] [--no-cargo] [--base-only] [--with-postgres17] [instance|controller|etcd]..."
for arg in "$@"; do
  case "$arg" in
    --release) profile=release ;;
    --debug) profile=debug ;;
    --no-cargo) cargo_build=0 ;;
    --base-only) base_only=1 ;;
    --with-postgres17) with_pg17=1 ;;
    instance|controller|etcd) images+=("$arg") ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
[ ${#images[@]} -gt 0 ] || images=(instance controller etcd)
[ "$with_pg17" -eq 0 ] || [[ " ${images[*]} " == *" instance "* ]] || images+=(instance)
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
  docker_build "$ctx" "pgwarden/$name:latest" "$base"
}

# Builds the context directory $1 as tag $2 from image $3, and removes the context.
docker_build() {
  local ctx=$1 tag=$2 from=$3
  # The legacy builder: BuildKit would want to pull its frontend, and this engine has no registry.
  # Its output (and its deprecation notice) is shown only when the build fails.
  local out old_id new_id
  old_id=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
  if ! out=$(DOCKER_BUILDKIT=0 docker build -q -f "$ctx/Containerfile" --build-arg "BASE=$from" \
    -t "$tag" "$ctx" 2>&1); then
    echo "$out" >&2
    rm -rf "$ctx"
    return 1
  fi
  rm -rf "$ctx"
  # The image this tag named before (new binaries) is left untagged; remove it by its ID unless
  # a container still uses it, so repeated test runs do not fill the disk.
  new_id=$(docker image inspect -f '{{.Id}}' "$tag")
  if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    docker rmi "$old_id" >/dev/null 2>&1 || true
  fi
  log "built $tag"
}

# pgwarden/instance:latest-pg17 (--with-postgres17): scripts/build-postgres17.sh's trixie tree is
# relinked for the host's path (/var/cache/pgwarden/postgresql-17/root, written into every
# executable's interpreter and rpath), so its parts are copied into the context in Debian's
# places, and the executables are relinked once more to the loader and libraries there:
#   usr/lib/postgresql/17/bin, lib   postgresql-17's, without llvmjit (JIT unavailable, as in
#                                    the image's 15) and without pgxs's bitcode
#   usr/share/postgresql/17          its share directory, without the manual pages
#   usr/lib/postgresql/17/trixie-lib trixie's loader and the libraries (closure of DT_NEEDED of
#                                    the executables and modules, plus libgcc_s, which glibc
#                                    loads for thread cancellation) under their sonames
#   usr/share/doc/postgresql-17-trixie/<package>/copyright  the copied packages' licences
# Postgres finds share and lib relative to its own executable, so nothing else is needed.
build_postgres17_image() {
  local cache=${PGWARDEN_PG17_CACHE:-/var/cache/pgwarden/postgresql-17}
  local src="$cache/root" ctx dst libdir exe lib name pending found=() start
  start=$(date +%s)
  if [ ! -f "$cache/.installed" ] || [ ! -x "$src/usr/lib/postgresql/17/bin/postgres" ]; then
    log "PostgreSQL 17 tree missing: scripts/build-postgres17.sh"
    "$repo/scripts/build-postgres17.sh" >&2
  fi
  command -v patchelf >/dev/null || { log "patchelf is missing (scripts/build-postgres17.sh installs it)"; return 1; }
  ctx=$(mktemp -d)
  cp -a "$here/instance-pg17/." "$ctx/"
  dst="$ctx/root"
  libdir=/usr/lib/postgresql/17/trixie-lib
  mkdir -p "$dst/usr/lib/postgresql/17" "$dst/usr/share/postgresql" "$dst$libdir"
  cp -a "$src/usr/lib/postgresql/17/bin" "$src/usr/lib/postgresql/17/lib" "$dst/usr/lib/postgresql/17/"
  rm -rf "$dst"/usr/lib/postgresql/17/lib/llvmjit* "$dst"/usr/lib/postgresql/17/lib/bitcode
  cp -a "$src/usr/share/postgresql/17" "$dst/usr/share/postgresql/"
  rm -rf "$dst/usr/share/postgresql/17/man"
  # trixie's pgBackRest (2.55) replaces bookworm's /usr/bin/pgbackrest (2.45, which does not know
  # 17; 2.53 was the first that did). It serves 15 as well, and absolute /usr/bin/pgbackrest
  # paths in configurations keep working.
  [ -x "$src/usr/bin/pgbackrest" ] \
    || { log "pgBackRest missing from $src: rerun scripts/build-postgres17.sh"; rm -rf "$ctx"; return 1; }
  mkdir -p "$dst/usr/bin"
  cp -L "$src/usr/bin/pgbackrest" "$dst/usr/bin/pgbackrest"
  # The libraries: a breadth-first walk over DT_NEEDED, each looked up where the host tree's
  # rpath looks (trixie's usr/lib/x86_64-linux-gnu, then postgres's lib).
  pending=(libgcc_s.so.1)
  for exe in "$dst"/usr/lib/postgresql/17/bin/* "$dst"/usr/lib/postgresql/17/lib/*.so \
    "$dst/usr/bin/pgbackrest"; do
    head -c4 "$exe" | grep -q $'\x7fELF' || continue
    mapfile -t -O "${#pending[@]}" pending < <(patchelf --print-needed "$exe")
  done
  while [ ${#pending[@]} -gt 0 ]; do
    name=${pending[0]}; pending=("${pending[@]:1}")
    [[ " ${found[*]} " == *" $name "* ]] && continue
    found+=("$name")
    lib="$src/usr/lib/x86_64-linux-gnu/$name"
    [ -e "$lib" ] || continue
    cp -L "$lib" "$dst$libdir/$name"
    mapfile -t -O "${#pending[@]}" pending < <(patchelf --print-needed "$lib")
  done
  for name in "${found[@]}"; do
    [ -e "$dst$libdir/$name" ] || [ -e "$dst/usr/lib/postgresql/17/lib/$name" ] \
      || { log "PostgreSQL 17 needs $name, which is not in $src"; rm -rf "$ctx"; return 1; }
  done
  cp -L "$src/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "$dst$libdir/"
  for exe in "$dst"/usr/lib/postgresql/17/bin/* "$dst/usr/bin/pgbackrest"; do
    [ -f "$exe" ] && [ ! -L "$exe" ] || continue
    head -c4 "$exe" | grep -q $'\x7fELF' || continue
    patchelf --set-interpreter "$libdir/ld-linux-x86-64.so.2" --force-rpath \
      --set-rpath "$libdir:/usr/lib/postgresql/17/lib" "$exe"
  done
  for lib in "$src"/usr/share/doc/*/copyright; do
    name=$(basename "$(dirname "$lib")")
    mkdir -p "$dst/usr/share/doc/postgresql-17-trixie/$name"
    cp -L "$lib" "$dst/usr/share/doc/postgresql-17-trixie/$name/"
  done
  log "staged PostgreSQL 17 and pgBackRest $("$src/usr/bin/pgbackrest" version | cut -d' ' -f2) ($(du -sh "$dst" | cut -f1), ${#found[@]} libraries) in $(( $(date +%s) - start ))s"
  docker_build "$ctx" pgwarden/instance:latest-pg17 pgwarden/instance:latest
}

if want instance; then build_image instance pgwarden pgwarden-fence-guard pgwarden-init; fi
if [ "$with_pg17" -eq 1 ]; then build_postgres17_image; fi
if want controller; then build_image controller pgwarden-controller; fi
if want etcd; then build_image etcd; fi
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^pgwarden/' >&2
