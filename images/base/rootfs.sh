#!/usr/bin/env bash
# Makes the root filesystem of pgwarden/base as a tarball: Debian 12 (bookworm, minbase) with
# everything the images run preinstalled from Debian's packages. Run by images/build.sh, which
# names the base image after a hash of this file, so any change here makes a new base.
#
#   images/base/rootfs.sh OUT.tar MIRROR
set -euo pipefail

out=$1
mirror=$2

# postgres and pgBackRest for the instance, PgBouncer for the controller's pooler Pods (they
# run the instance image), etcd for the DCS image; ca-certificates for TLS to etcd, S3 and the
# Kubernetes API; tzdata for log and backup-schedule times.
packages=(
  postgresql-15 postgresql-client-15
  pgbackrest
  pgbouncer
  etcd-server
  ca-certificates
  tzdata
)

root=$(mktemp -d "$(dirname "$out")/rootfs.XXXXXX")
log=$out.log
cleanup() {
  # Never delete through a mounted /proc.
  if mountpoint -q "$root/proc"; then umount "$root/proc" || return; fi
  rm -rf "$root"
}
trap cleanup EXIT

echo "rootfs.sh: debootstrap bookworm into $root (a few minutes, once; log in $log)" >&2
if ! debootstrap --variant=minbase bookworm "$root" "$mirror" >"$log" 2>&1; then
  tail -20 "$log" >&2
  exit 1
fi
# No service may start inside the chroot (policy-rc.d 101 = "action not allowed"), and
# postgresql-common must not create a "main" cluster: pgwarden runs initdb itself.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
mkdir -p "$root/etc/postgresql-common/createcluster.d"
echo 'create_main_cluster = false' >"$root/etc/postgresql-common/createcluster.d/pgwarden.conf"
# Documentation, manual pages and translations are not needed in an image.
cat >"$root/etc/dpkg/dpkg.cfg.d/01-nodoc" <<'NODOC'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
NODOC
# Some maintainer scripts read /proc.
mount -t proc proc "$root/proc"
if ! chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
  --no-install-recommends "${packages[@]}" >>"$log" 2>&1; then
  tail -20 "$log" >&2
  exit 1
fi
chroot "$root" apt-get clean
umount "$root/proc"
# PostgreSQL's JIT provider and the LLVM it loads are a third of the image (libLLVM, libz3,
# bitcode); without llvmjit.so postgres runs with JIT unavailable, which is what short OLTP
# queries want anyway. locale-gen's source data is not needed either: initdb uses C.UTF-8.
rm -rf "$root"/usr/lib/postgresql/15/lib/llvmjit* "$root"/usr/lib/postgresql/15/lib/bitcode \
  "$root"/usr/lib/x86_64-linux-gnu/libLLVM-*.so* "$root"/usr/lib/x86_64-linux-gnu/libz3.so* \
  "$root"/usr/share/i18n/locales "$root"/usr/share/i18n/charmaps
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/tmp/*
# The host's resolver and host name do not belong in the image; Docker provides its own.
: >"$root/etc/resolv.conf"
rm -f "$root/etc/hostname"
tar -C "$root" --numeric-owner -cf "$out.partial" .
mv "$out.partial" "$out"
