#!/usr/bin/env bash
# Build the project image with `make image` wherever that is possible:
#   1. make sure the engine answers (tools/image/ensure_engine.sh starts dockerd when it can);
#   2. pick the base: $BASE (and $BUILD_BASE) if given; else the Dockerfile's default
#      python:3.11-slim-bookworm when it is present or can be pulled; else the offline bases from
#      tools/image/make_base.sh (runtime lumina-base:bookworm, build stage lumina-base:bookworm-build);
#   3. stage extra CA certificates for pip (a TLS-inspecting proxy) into .whl/ca/ (build stage only);
#   4. make image BASE=... BUILD_BASE=... (GIT_SHA, and WHEELHOUSE / PIP_INDEX_URL /
#      PIP_EXTRA_INDEX_URL / PIP_TRUSTED_HOST when set in the environment, are passed by make).
#
# Usage: tools/image/build.sh            (run from anywhere; works in the repository root)
# Environment: IMAGE (lumina-pipeline:0.1.0), CONTAINER_ENGINE (docker), BASE (auto),
#   OFFLINE_BASE (lumina-base:bookworm), DEFAULT_BASE (python:3.11-slim-bookworm),
#   PULL_TIMEOUT_S (120), BUILD_CA (space-separated .crt files; default: the host's
#   /usr/local/share/ca-certificates/*.crt; BUILD_CA= disables).
# Exit status: 0 built, 3 no engine or no base can be had here (reason on stderr), else a failure.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

export CONTAINER_ENGINE=${CONTAINER_ENGINE:-docker}
export IMAGE=${IMAGE:-lumina-pipeline:0.1.0}
OFFLINE_BASE=${OFFLINE_BASE:-lumina-base:bookworm}
OFFLINE_BUILD_BASE=${OFFLINE_BUILD_BASE:-${OFFLINE_BASE}-build}
DEFAULT_BASE=${DEFAULT_BASE:-python:3.11-slim-bookworm}
PULL_TIMEOUT_S=${PULL_TIMEOUT_S:-120}
log() { echo "build: $*" >&2; }

"$here/ensure_engine.sh" || exit $?

if [[ -z "${BASE:-}" ]]; then
  if "$CONTAINER_ENGINE" image inspect "$DEFAULT_BASE" >/dev/null 2>&1 \
    || timeout "$PULL_TIMEOUT_S" "$CONTAINER_ENGINE" pull -q "$DEFAULT_BASE" >/dev/null 2>&1; then
    BASE=""
    log "base: $DEFAULT_BASE"
  else
    log "cannot pull $DEFAULT_BASE; using the offline base $OFFLINE_BASE"
    BASE_IMAGE=$OFFLINE_BASE BUILD_BASE_IMAGE=$OFFLINE_BUILD_BASE "$here/make_base.sh" || exit $?
    BASE=$OFFLINE_BASE
    BUILD_BASE=$OFFLINE_BUILD_BASE
  fi
fi

# Extra CAs, for pip inside the build only (the Dockerfile reads .whl/ca/*.crt in its build stage).
rm -rf .whl/ca
if [[ -z "${BUILD_CA+x}" ]]; then
  BUILD_CA=$(ls /usr/local/share/ca-certificates/*.crt 2>/dev/null | tr '\n' ' ' || true)
fi
if [[ -n "${BUILD_CA// /}" ]]; then
  mkdir -p .whl/ca
  # shellcheck disable=SC2086
  cp $BUILD_CA .whl/ca/
  log "trusting extra CAs during the build: $BUILD_CA"
fi

start=$(date +%s)
make --no-print-directory image ${BASE:+BASE="$BASE"} ${BUILD_BASE:+BUILD_BASE="$BUILD_BASE"} IMAGE="$IMAGE" CONTAINER_ENGINE="$CONTAINER_ENGINE"
log "built $IMAGE in $(( $(date +%s) - start )) s"
