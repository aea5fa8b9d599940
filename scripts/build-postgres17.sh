#!/usr/bin/env bash
# PostgreSQL 17 on a Debian 12 (bookworm) host, for the major-version upgrade tests (15 -> 17 with
# pg_upgrade). Bookworm ships only postgresql-15; Debian 13 (trixie) ships postgresql-17.
#
# Why not built from the source package: the package mirror this project reaches serves
# trixie's binary packages but answers 404 for its source files (`apt-get source postgresql-17`
# fails for the version the Sources index names), so a build from source cannot be made
# reproducible here. Instead this script installs trixie's own binary packages into a private
# root, without touching the host's packages:
#   1. a private apt configuration (its own sources list, state and cache under the cache
#      directory; the host's /etc/apt is not read or changed) resolves `postgresql-17` and its
#      library closure on trixie and downloads the .debs;
#   2. `dpkg -x` unpacks them into $root/root (no maintainer script runs, nothing is registered
#      in the host's dpkg database);
#   3. `patchelf` points every executable under usr/lib/postgresql/17/bin at trixie's dynamic
#      loader and libraries in that root (the binaries need trixie's glibc 2.41; bookworm has
#      2.36), so they run directly on the host. Postgres finds its share and lib directories
#      relative to its own executable, so the relocated tree works as installed.
# The result is cached outside the repository, so a reused machine skips it:
#   /var/cache/pgwarden/postgresql-17/bin -> root/usr/lib/postgresql/17/bin
#   /var/cache/pgwarden/postgresql-17/pgbackrest -> root/usr/bin/pgbackrest (trixie's, for 17)
# Test harnesses depend on exactly this path (PGWARDEN_PG17_BIN_DIR overrides it). Idempotent;
# concurrent runs wait for each other (flock).
set -euo pipefail

root=${PGWARDEN_PG17_CACHE:-/var/cache/pgwarden/postgresql-17}
bin="$root/bin"
done_marker="$root/.installed"
if [ -f "$done_marker" ] && [ -x "$bin/pg_upgrade" ] && [ -x "$root/pgbackrest" ]; then
  echo "build-postgres17: cached in $bin"
  exit 0
fi

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

as_root mkdir -p "$root"
as_root chown "$(id -u):$(id -g)" "$root"
exec 9>"$root/.lock"
flock 9
if [ -f "$done_marker" ] && [ -x "$bin/pg_upgrade" ] && [ -x "$root/pgbackrest" ]; then
  echo "build-postgres17: cached in $bin"
  exit 0
fi
start=$(date +%s)

if ! command -v patchelf >/dev/null; then
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends patchelf
fi

# The private apt: trixie's binary index only, its own state, no host configuration.
apt="$root/apt"
rm -rf "$apt" "$root/root" "$bin"
mkdir -p "$apt/etc/apt/apt.conf.d" "$apt/etc/apt/preferences.d" "$apt/etc/apt/sources.list.d" \
  "$apt/var/lib/apt/lists/partial" "$apt/var/cache/apt/archives/partial" "$apt/var/lib/dpkg"
touch "$apt/var/lib/dpkg/status" "$apt/apt.conf"
cat >"$apt/etc/apt/sources.list" <<'SRC'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
SRC
apt_private() {
  APT_CONFIG="$apt/apt.conf" apt-get -qq \
    -o Dir="$apt/" \
    -o Dir::State::status="$apt/var/lib/dpkg/status" \
    -o APT::Architecture=amd64 -o APT::Architectures::=amd64 \
    -o APT::Install-Recommends=false \
    -o Debug::NoLocking=true \
    -o APT::Sandbox::User=root \
    "$@"
}
apt_private update
# postgresql-17's closure from an empty status: the server, its client tools (pg_dump for
# pg_upgrade), libpq5 and the libraries they link, and the essential set apt adds. And trixie's
# pgBackRest: bookworm's 2.45 does not know PostgreSQL 17 (2.53 was the first that did), so a
# cluster upgraded to 17 needs it for its archiving and backups (it serves 15 as well).
apt_private install -y --download-only postgresql-17 postgresql-client-17 pgbackrest
debs=("$apt"/var/cache/apt/archives/*.deb)
echo "build-postgres17: ${#debs[@]} packages downloaded"

sysroot="$root/root"
mkdir -p "$sysroot"
for deb in "${debs[@]}"; do
  dpkg-deb -x "$deb" "$sysroot"
done
pgbin="$sysroot/usr/lib/postgresql/17/bin"
[ -x "$pgbin/postgres" ] || { echo "build-postgres17: no postgres in $pgbin" >&2; exit 1; }

# trixie has merged /usr: the loader is usr/lib64 and libraries are under usr/lib.
loader="$sysroot/usr/lib64/ld-linux-x86-64.so.2"
[ -e "$loader" ] || loader="$sysroot/lib64/ld-linux-x86-64.so.2"
[ -e "$loader" ] || { echo "build-postgres17: no dynamic loader in $sysroot" >&2; exit 1; }
loader=$(readlink -f "$loader")
libs="$sysroot/usr/lib/x86_64-linux-gnu:$sysroot/usr/lib/postgresql/17/lib"
for exe in "$pgbin"/* "$sysroot/usr/bin/pgbackrest"; do
  [ -f "$exe" ] && [ ! -L "$exe" ] || continue
  # Shell and Perl scripts (pg_config wrappers and the like) stay as they are.
  head -c4 "$exe" | grep -q $'\x7fELF' || continue
  patchelf --set-interpreter "$loader" --force-rpath --set-rpath "$libs" "$exe"
done
ln -sfn "$pgbin" "$bin"
ln -sfn "$sysroot/usr/bin/pgbackrest" "$root/pgbackrest"
rm -rf "$apt"

"$bin/postgres" --version
"$root/pgbackrest" version
"$bin/pg_upgrade" --version
touch "$done_marker"
echo "build-postgres17: installed to $root in $(( $(date +%s) - start ))s"
