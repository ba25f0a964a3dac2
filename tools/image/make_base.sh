#!/usr/bin/env bash
# Build an offline base image for the Dockerfile where no image registry can be pulled from:
#   debootstrap (Debian bookworm, minbase + python3.11, venv/pip, ca-certificates, g++, git)
#   -> rootfs tarball -> `docker import` (or podman import / buildah).
#
# Usage:  sudo tools/image/make_base.sh            # builds lumina-base:bookworm unless it exists
#         FORCE=1 tools/image/make_base.sh         # rebuild even if it exists
# Then:   make image BASE=lumina-base:bookworm
#
# Environment (all optional):
#   BASE_IMAGE        image name to create           (default lumina-base:bookworm)
#   CONTAINER_ENGINE  docker | podman | buildah       (default docker)
#   SUITE             Debian suite; must ship python3.11 (default bookworm; trixie has 3.13)
#   MIRROR            Debian mirror                   (default http://deb.debian.org/debian)
#   SECURITY_MIRROR   Debian security mirror          (default http://deb.debian.org/debian-security)
#   UPGRADE           1 = apply bookworm-updates/-security in the rootfs (default 1)
#   FORCE             1 = rebuild even if BASE_IMAGE exists (default 0)
#   WORK_DIR          scratch directory for the rootfs (default: mktemp under /tmp)
# Needs root (debootstrap, chroot) and the debootstrap + debian-archive-keyring packages.
# Exit status: 0 built or already there, 3 a precondition is missing (not root, no debootstrap or
# engine), anything else a failed build.
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-lumina-base:bookworm}
CONTAINER_ENGINE=${CONTAINER_ENGINE:-docker}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
UPGRADE=${UPGRADE:-1}
FORCE=${FORCE:-0}
# python3-venv brings ensurepip (pip inside the Dockerfile's venv, no externally-managed error).
PACKAGES=python3.11,python3-venv,ca-certificates,g++,git

log() { echo "make_base: $*" >&2; }
die() { log "error: $*"; exit 1; }
unmet() { log "cannot build here: $*"; exit 3; }  # exit 3: a missing precondition, not a failure

case "$CONTAINER_ENGINE" in
  buildah) engine=(buildah --storage-driver "${BUILDAH_STORAGE_DRIVER:-vfs}") ;;
  *) engine=("$CONTAINER_ENGINE") ;;
esac

image_exists() {
  case "$CONTAINER_ENGINE" in
    buildah) "${engine[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1 ;;
    *) "${engine[@]}" image inspect "$BASE_IMAGE" >/dev/null 2>&1 ;;
  esac
}

if [[ "$FORCE" != 1 ]] && image_exists; then
  log "$BASE_IMAGE already exists (FORCE=1 rebuilds it)"
  exit 0
fi

[[ $(id -u) -eq 0 ]] || unmet "debootstrap needs root"
command -v debootstrap >/dev/null || unmet "debootstrap not found (apt-get install -y debootstrap)"
command -v "${engine[0]}" >/dev/null || unmet "$CONTAINER_ENGINE not found"

work=${WORK_DIR:-$(mktemp -d /tmp/lumina-base.XXXXXX)}
rootfs=$work/rootfs
mounted=0
cleanup() {
  if [[ $mounted == 1 ]]; then umount "$rootfs/proc" 2>/dev/null || umount -l "$rootfs/proc" || true; fi
  [[ -n "${WORK_DIR:-}" ]] || rm -rf "$work"
}
trap cleanup EXIT
rm -rf "$rootfs"
mkdir -p "$rootfs"

start=$(date +%s)
log "debootstrap $SUITE (minbase + $PACKAGES) from $MIRROR"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
  || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }

cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF

if [[ "$UPGRADE" == 1 ]]; then
  log "applying $SUITE-updates and $SUITE-security"
  mount -t proc proc "$rootfs/proc" && mounted=1
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  chroot "$rootfs" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get update -qq && apt-get -y -qq -o Dpkg::Options::=--force-confold upgrade' >"$work/upgrade.log" 2>&1 \
    || { tail -n 30 "$work/upgrade.log" >&2; die "apt-get upgrade in the rootfs failed (log above)"; }
  umount "$rootfs/proc" && mounted=0
fi

# Sanity: the interpreter the project needs, with a working venv + pip.
chroot "$rootfs" /usr/bin/python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || die "python3 in the rootfs is not 3.11"
chroot "$rootfs" /bin/sh -c 'python3 -m venv /tmp/venv-check && /tmp/venv-check/bin/python -m pip --version >/dev/null && rm -rf /tmp/venv-check' \
  || die "python3 -m venv / pip does not work in the rootfs"

# Slim it like the official images: no apt lists, package cache, docs or host resolver.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
  "$rootfs"/var/log/*.log \
  "$rootfs"/tmp/* "$rootfs"/root/.cache
: >"$rootfs/etc/resolv.conf"
echo "lumina-base" >"$rootfs/etc/hostname"

tarball=$work/rootfs.tar
tar --numeric-owner --xattrs -C "$rootfs" \
  --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf "$tarball" .

changes=(
  'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
  'ENV LANG=C.UTF-8'
  'CMD ["/bin/bash"]'
)
log "importing $tarball ($(du -h "$tarball" | cut -f1)) as $BASE_IMAGE with $CONTAINER_ENGINE"
case "$CONTAINER_ENGINE" in
  buildah)
    ctr=$("${engine[@]}" from scratch)
    "${engine[@]}" add "$ctr" "$tarball" /
    "${engine[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
    "${engine[@]}" commit --rm "$ctr" "$BASE_IMAGE" >/dev/null
    ;;
  *)
    args=()
    for c in "${changes[@]}"; do args+=(--change "$c"); done
    "${engine[@]}" import "${args[@]}" "$tarball" "$BASE_IMAGE" >/dev/null
    ;;
esac
image_exists || die "$BASE_IMAGE was not created"
log "built $BASE_IMAGE in $(( $(date +%s) - start )) s"
