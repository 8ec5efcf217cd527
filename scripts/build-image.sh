#!/usr/bin/env bash
# Builds the local Docker image mm-node:dev without any container registry:
# a Debian bookworm root filesystem from Debian's package mirror (debootstrap,
# minbase + postgresql-15, iptables, iproute2, procps, ca-certificates), the
# release mmd and mmctl of this workspace, the mm_output plugin
# (scripts/build-plugin.sh) and docker/entrypoint.sh, imported
# with `docker import`. docker/Dockerfile builds the same image FROM
# debian:bookworm for those who have a registry.
#
# Idempotent and quick when nothing changed:
# - the debootstrap root filesystem is cached as a tarball under
#   $CARGO_TARGET_DIR (default target/)/mm-image/, keyed by the package list
#   and suite (delete it, or pass --refresh-base, to fetch fresh packages);
# - the image carries a label mm.build-hash (base tarball, mmd, mmctl,
#   entrypoint, image settings); when the existing mm-node:dev has the same
#   hash, nothing is imported.
#
# Usage: scripts/build-image.sh [--refresh-base] [--tag NAME]
# Environment: MM_DEBIAN_MIRROR (default http://deb.debian.org/debian),
#              CARGO_TARGET_DIR, CARGO_BUILD_JOBS.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TAG=mm-node:dev
REFRESH=0
while [ $# -gt 0 ]; do
    case "$1" in
    --refresh-base) REFRESH=1 ;;
    --tag) TAG=${2:?--tag needs a value}; shift ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "build-image: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

SUITE=bookworm
MIRROR=${MM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=postgresql-15,iptables,iproute2,procps,ca-certificates
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
WORK=$TARGET_DIR/mm-image
# Keep in step with docker/Dockerfile.
IMAGE_ENV=(PATH=/usr/local/bin:/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin
    PGDATA=/var/lib/mm/pgdata MM_CONFIG=/etc/mm/mmd.toml LANG=C.UTF-8)
IMAGE_EXPOSE=(5432 6432 7100)
# The data directory is a volume: PostgreSQL's files live on the host's file
# system, not in the container's overlay (after a `docker kill` + `start` on
# CI, recovery failed opening a relation's file with ENXIO on the overlay).
IMAGE_VOLUME=/var/lib/mm

say() { echo "build-image: $*" >&2; }
die() { say "$*"; exit 1; }
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root for: $*"
    fi
}

command -v docker >/dev/null 2>&1 || die "docker is not installed"
docker info >/dev/null 2>&1 || die "cannot talk to the Docker daemon (is it running? are you in the docker group?)"

t0=$(date +%s)

# 1. mmd and mmctl, release build.
say "cargo build --release -p mm-runtime --bins"
(cd "$ROOT" && cargo build --release -p mm-runtime --bins ${CARGO_BUILD_JOBS:+-j "$CARGO_BUILD_JOBS"})
BIN=$TARGET_DIR/release
for b in mmd mmctl; do [ -x "$BIN/$b" ] || die "$BIN/$b missing after the build"; done
# The echo-filtering output plugin, built against this host's PostgreSQL 15
# headers (the image's server is the same Debian major version).
say "scripts/build-plugin.sh --no-install"
"$ROOT/scripts/build-plugin.sh" --no-install
PLUGIN=$TARGET_DIR/mm_output/mm_output.so

# 2. The base root filesystem, cached.
mkdir -p "$WORK"
base_key=$( {
    printf '%s\n' "$SUITE" "$MIRROR" "$PACKAGES" minbase
    cat "$ROOT/docker/prepare-rootfs.sh"
} | sha256sum | cut -c1-16)
BASE=$WORK/base-$SUITE-$base_key.tar
if [ "$REFRESH" = 1 ]; then rm -f "$BASE"; fi
if [ ! -s "$BASE" ]; then
    if ! command -v debootstrap >/dev/null 2>&1; then
        say "installing debootstrap"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
    fi
    STAGE=$WORK/rootfs.debootstrap
    as_root rm -rf "$STAGE"
    mkdir -p "$STAGE"
    # No daemon may start inside the target while packages are configured.
    mkdir -p "$STAGE/usr/sbin"
    printf '#!/bin/sh\nexit 101\n' >"$STAGE/usr/sbin/policy-rc.d"
    chmod +x "$STAGE/usr/sbin/policy-rc.d"
    say "debootstrap --variant=minbase --include=$PACKAGES $SUITE ($MIRROR)"
    if ! as_root debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$STAGE" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1; then
        tail -n 30 "$WORK/debootstrap.log" >&2
        [ -f "$STAGE/debootstrap/debootstrap.log" ] && tail -n 30 "$STAGE/debootstrap/debootstrap.log" >&2
        die "debootstrap failed (full log: $WORK/debootstrap.log)"
    fi
    # Trim and prepare, exactly as docker/Dockerfile does.
    as_root install -m 0755 "$ROOT/docker/prepare-rootfs.sh" "$STAGE/prepare-rootfs.sh"
    as_root chroot "$STAGE" /prepare-rootfs.sh
    as_root rm -f "$STAGE/prepare-rootfs.sh"
    # Nothing must be left running from the target (a package's postinst).
    for p in /proc/[0-9]*; do
        if [ "$(readlink "$p/root" 2>/dev/null)" = "$STAGE" ]; then
            die "a process ($(basename "$p")) still runs inside $STAGE; stop it and retry"
        fi
    done
    as_root tar --numeric-owner -C "$STAGE" -cf "$BASE.tmp" .
    as_root chown "$(id -u):$(id -g)" "$BASE.tmp"
    mv "$BASE.tmp" "$BASE"
    as_root rm -rf "$STAGE"
    say "cached the base root filesystem: $BASE ($(du -h "$BASE" | cut -f1))"
else
    say "reusing the cached base root filesystem $BASE"
fi

# 3. Import, unless the image is already exactly this.
hash=$( {
    sha256sum "$BASE" "$BIN/mmd" "$BIN/mmctl" "$PLUGIN" "$ROOT/docker/entrypoint.sh" | cut -d' ' -f1
    printf '%s\n' "${IMAGE_ENV[@]}" "${IMAGE_EXPOSE[@]}" "$IMAGE_VOLUME"
} | sha256sum | cut -c1-32)
have=$(docker image inspect "$TAG" --format '{{ index .Config.Labels "mm.build-hash" }}' 2>/dev/null || true)
if [ "$have" = "$hash" ]; then
    say "$TAG is up to date (mm.build-hash $hash); $(($(date +%s) - t0)) s"
    exit 0
fi
old_id=$(docker image inspect "$TAG" --format '{{.Id}}' 2>/dev/null || true)

ROOTFS=$WORK/rootfs
as_root rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"
as_root tar --numeric-owner -C "$ROOTFS" -xf "$BASE"
# Stripped copies (the image needs no debug symbols; the hash is of the originals).
strip=(-s)
command -v strip >/dev/null 2>&1 || strip=()
as_root install -m 0755 "${strip[@]}" "$BIN/mmd" "$BIN/mmctl" "$ROOTFS/usr/local/bin/"
as_root install -m 0755 "$ROOT/docker/entrypoint.sh" "$ROOTFS/usr/local/bin/mm-entrypoint"
as_root install -m 0755 "$PLUGIN" "$ROOTFS/usr/lib/postgresql/15/lib/mm_output.so"

changes=(--change 'ENTRYPOINT ["/usr/local/bin/mm-entrypoint"]'
    --change "LABEL mm.build-hash=$hash")
for e in "${IMAGE_ENV[@]}"; do changes+=(--change "ENV $e"); done
for p in "${IMAGE_EXPOSE[@]}"; do changes+=(--change "EXPOSE $p"); done
changes+=(--change "VOLUME $IMAGE_VOLUME")
say "docker import -> $TAG"
as_root tar --numeric-owner -C "$ROOTFS" -c . | docker import "${changes[@]}" - "$TAG" >/dev/null
as_root rm -rf "$ROOTFS"

new_id=$(docker image inspect "$TAG" --format '{{.Id}}')
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    # The previous build, unless a container still uses it.
    docker image rm "$old_id" >/dev/null 2>&1 || true
fi
size=$(docker image inspect "$TAG" --format '{{.Size}}')
say "built $TAG ($new_id, $((size / 1024 / 1024)) MiB, mm.build-hash $hash) in $(($(date +%s) - t0)) s"
