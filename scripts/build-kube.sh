#!/usr/bin/env bash
# Builds kube-apiserver and kube-controller-manager v1.20 from Debian's `kubernetes` source
# package (bookworm: 1.20.5+really1.20.2, the complete upstream tree with vendor/), for the
# Kubernetes-mode tests. No registry ships these binaries. The result is cached outside the
# repository, so a reused machine skips the build (~8 minutes on 2 cores):
#   /var/cache/pgwarden/kubernetes-1.20/bin/kube-apiserver
#   /var/cache/pgwarden/kubernetes-1.20/bin/kube-controller-manager
# Other code (test harnesses) depends on exactly these paths. Idempotent; concurrent runs
# wait for each other (flock).
set -euo pipefail

root=${PGWARDEN_KUBE_CACHE:-/var/cache/pgwarden/kubernetes-1.20}
bin="$root/bin"
if [ -x "$bin/kube-apiserver" ] && [ -x "$bin/kube-controller-manager" ]; then
  echo "build-kube: cached in $bin"
  exit 0
fi

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

as_root mkdir -p "$root"
as_root chown "$(id -u):$(id -g)" "$root"
exec 9>"$root/.lock"
flock 9
# Another run may have finished while we waited for the lock.
if [ -x "$bin/kube-apiserver" ] && [ -x "$bin/kube-controller-manager" ]; then
  echo "build-kube: cached in $bin"
  exit 0
fi

# `apt-get source` needs a deb-src entry for bookworm. The image's deb822 file has only
# `Types: deb`; add a separate file rather than editing it.
src_list=/etc/apt/sources.list.d/pgwarden-debian-src.sources
updated=0
if ! grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  as_root tee "$src_list" >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  updated=1
fi

packages=(golang-go rsync golang-github-modern-go-reflect2-dev dpkg-dev make)
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$updated" -eq 1 ] || as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

work="$root/work"
src=$(find "$work" -maxdepth 1 -type d -name 'kubernetes-1.20*' 2>/dev/null | head -n1 || true)
if [ -z "$src" ] || [ ! -f "$src/Makefile" ]; then
  rm -rf "$work"
  mkdir -p "$work"
  # A deb-src entry may exist while apt's source lists are stale or were cleaned: update once.
  if ! (cd "$work" && apt-get source -qq kubernetes); then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    (cd "$work" && apt-get source -qq kubernetes)
  fi
  src=$(find "$work" -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
fi
[ -n "$src" ] && [ -f "$src/Makefile" ] || { echo "build-kube: no source tree under $work" >&2; exit 1; }
echo "build-kube: source in $src"

# The vendored reflect2 1.0.1 breaks at run time with Go >= 1.18 (unsafe map iteration);
# Debian's 1.0.2 is API-compatible and fixes it.
reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
rm -rf "$src/vendor/github.com/modern-go/reflect2"
cp -r "$reflect2" "$src/vendor/github.com/modern-go/reflect2"

export GOCACHE="$root/gocache"
export GOFLAGS=
cd "$src"
# GOPATH mode through the upstream Makefile (plain `go build -mod=vendor` fails on this tree).
CGO_ENABLED=0 make WHAT=cmd/kube-apiserver
CGO_ENABLED=0 make WHAT=cmd/kube-controller-manager

mkdir -p "$bin"
for b in kube-apiserver kube-controller-manager; do
  built=$(find "$src/_output" -type f -name "$b" -perm -u+x | head -n1)
  [ -n "$built" ] || { echo "build-kube: $b not found under $src/_output" >&2; exit 1; }
  install -m 0755 "$built" "$bin/$b.tmp"
  mv "$bin/$b.tmp" "$bin/$b"
done
"$bin/kube-apiserver" --version
# The 2 GB source and build tree is not needed once the binaries are installed.
cd /
rm -rf "$work" "$GOCACHE"
echo "build-kube: installed to $bin"
