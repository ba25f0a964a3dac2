#!/usr/bin/env bash
# Build the offline base images for the Dockerfile where no image registry can be pulled from:
#   debootstrap (Debian bookworm, minbase + python3.11, venv/pip, ca-certificates)
#   -> rootfs tarball -> `docker import` (or podman import / buildah) as BASE_IMAGE, the runtime
#      base: no compiler, no git;
#   the same rootfs + g++ and python3-dev (apt in the chroot) -> BUILD_BASE_IMAGE, the Dockerfile's build stage
#      (DeepSpeed's prebuilt op), so that build needs no Debian mirror.
#
# Usage:  sudo tools/image/make_base.sh            # builds both unless they exist
#         FORCE=1 tools/image/make_base.sh         # rebuild even if they exist
# Then:   make image BASE=lumina-base:bookworm BUILD_BASE=lumina-base:bookworm-build
#
# Environment (all optional):
#   BASE_IMAGE        runtime base to create          (default lumina-base:bookworm)
#   BUILD_BASE_IMAGE  build base to create (+ g++)    (default BASE_IMAGE with -build appended)
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
BUILD_BASE_IMAGE=${BUILD_BASE_IMAGE:-${BASE_IMAGE}-build}
CONTAINER_ENGINE=${CONTAINER_ENGINE:-docker}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
UPGRADE=${UPGRADE:-1}
FORCE=${FORCE:-0}
# python3-venv brings ensurepip (pip inside the Dockerfile's venv, no externally-managed error).
# The runtime base has no compiler and no git (the image records the commit from a build arg).
PACKAGES=python3.11,python3-venv,ca-certificates
BUILD_PACKAGES="g++ python3-dev"  # python3-dev: Python.h for the op DeepSpeed builds

log() { echo "make_base: $*" >&2; }
die() { log "error: $*"; exit 1; }
unmet() { log "cannot build here: $*"; exit 3; }  # exit 3: a missing precondition, not a failure

case "$CONTAINER_ENGINE" in
  buildah) engine=(buildah --storage-driver "${BUILDAH_STORAGE_DRIVER:-vfs}") ;;
  *) engine=("$CONTAINER_ENGINE") ;;
esac

image_exists() {  # image_exists NAME
  case "$CONTAINER_ENGINE" in
    buildah) "${engine[@]}" inspect --type image "$1" >/dev/null 2>&1 ;;
    *) "${engine[@]}" image inspect "$1" >/dev/null 2>&1 ;;
  esac
}

if [[ "$FORCE" != 1 ]] && image_exists "$BASE_IMAGE" && image_exists "$BUILD_BASE_IMAGE"; then
  log "$BASE_IMAGE and $BUILD_BASE_IMAGE already exist (FORCE=1 rebuilds them)"
  exit 0
fi

[[ $(id -u) -eq 0 ]] || unmet "debootstrap needs root"
command -v debootstrap >/dev/null || unmet "debootstrap not found (apt-get install -y debootstrap)"
command -v "${engine[0]}" >/dev/null || unmet "$CONTAINER_ENGINE not found"

work=${WORK_DIR:-$(mktemp -d /tmp/lumina-base.XXXXXX)}
rootfs=$work/rootfs
buildfs=$work/rootfs-build
mounted=""
cleanup() {
  if [[ -n $mounted ]]; then umount "$mounted/proc" 2>/dev/null || umount -l "$mounted/proc" || true; fi
  [[ -n "${WORK_DIR:-}" ]] || rm -rf "$work"
}
trap cleanup EXIT
rm -rf "$rootfs" "$buildfs"
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
  mount -t proc proc "$rootfs/proc" && mounted=$rootfs
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  chroot "$rootfs" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get update -qq && apt-get -y -qq -o Dpkg::Options::=--force-confold upgrade' >"$work/upgrade.log" 2>&1 \
    || { tail -n 30 "$work/upgrade.log" >&2; die "apt-get upgrade in the rootfs failed (log above)"; }
  umount "$rootfs/proc" && mounted=""
fi

# Sanity: the interpreter the project needs, with a working venv + pip.
chroot "$rootfs" /usr/bin/python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || die "python3 in the rootfs is not 3.11"
chroot "$rootfs" /bin/sh -c 'python3 -m venv /tmp/venv-check && /tmp/venv-check/bin/python -m pip --version >/dev/null && rm -rf /tmp/venv-check' \
  || die "python3 -m venv / pip does not work in the rootfs"

# The build base: a copy with the compiler, installed from the same mirror.
log "build base: + $BUILD_PACKAGES"
cp -a "$rootfs" "$buildfs"
mount -t proc proc "$buildfs/proc" && mounted=$buildfs
cp /etc/resolv.conf "$buildfs/etc/resolv.conf"
# shellcheck disable=SC2086
chroot "$buildfs" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
  sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $BUILD_PACKAGES" >"$work/build.log" 2>&1 \
  || { tail -n 30 "$work/build.log" >&2; die "apt-get install $BUILD_PACKAGES in the build rootfs failed (log above)"; }
umount "$buildfs/proc" && mounted=""
chroot "$buildfs" /bin/sh -c 'command -v g++ && test -f /usr/include/python3.11/Python.h' >/dev/null \
  || die "no g++ or Python.h in the build rootfs"
chroot "$rootfs" /bin/sh -c '! command -v g++ && ! command -v gcc && ! command -v git' >/dev/null \
  || die "the runtime rootfs has a compiler or git"

# Slim them like the official images: no apt lists, package cache, docs or host resolver.
slim() {
  local fs=$1
  rm -rf "$fs"/var/lib/apt/lists/* "$fs"/var/cache/apt/*.bin "$fs"/var/cache/apt/archives/*.deb \
    "$fs"/usr/share/doc/* "$fs"/usr/share/man/* "$fs"/usr/share/info/* "$fs"/usr/share/locale/* \
    "$fs"/var/log/*.log \
    "$fs"/tmp/* "$fs"/root/.cache
  : >"$fs/etc/resolv.conf"
  echo "lumina-base" >"$fs/etc/hostname"
}

import_image() {  # import_image ROOTFS IMAGE
  local fs=$1 name=$2 tarball
  tarball=$work/$(basename "$fs").tar
  tar --numeric-owner --xattrs -C "$fs" \
    --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf "$tarball" .
  log "importing $tarball ($(du -h "$tarball" | cut -f1)) as $name with $CONTAINER_ENGINE"
  case "$CONTAINER_ENGINE" in
    buildah)
      local ctr
      ctr=$("${engine[@]}" from scratch)
      "${engine[@]}" add "$ctr" "$tarball" /
      "${engine[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
      "${engine[@]}" commit --rm "$ctr" "$name" >/dev/null
      ;;
    *)
      "${engine[@]}" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        "$tarball" "$name" >/dev/null
      ;;
  esac
  rm -f "$tarball"
  image_exists "$name" || die "$name was not created"
}

slim "$rootfs"
slim "$buildfs"
import_image "$rootfs" "$BASE_IMAGE"
import_image "$buildfs" "$BUILD_BASE_IMAGE"
log "built $BASE_IMAGE and $BUILD_BASE_IMAGE in $(( $(date +%s) - start )) s"
