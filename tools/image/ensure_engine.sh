#!/usr/bin/env bash
# Make sure a container engine answers, starting a Docker daemon when possible.
#
#   tools/image/ensure_engine.sh        # exit 0: `$CONTAINER_ENGINE info` works (now)
#                                       # exit 3: no engine can be reached or started (reason on stderr)
#
# docker: when `docker info` fails and we are root with dockerd installed (apt-get install docker.io),
# start `dockerd --data-root $DOCKER_DATA_ROOT` in the background (log: $DOCKERD_LOG) and wait for it.
# podman is daemonless: only `podman info` is checked.
#
# Environment: CONTAINER_ENGINE (docker), DOCKER_DATA_ROOT (/tmp/docker-data),
#              DOCKERD_LOG (/tmp/lumina-dockerd.log), ENGINE_WAIT_S (60)
set -uo pipefail

CONTAINER_ENGINE=${CONTAINER_ENGINE:-docker}
DOCKER_DATA_ROOT=${DOCKER_DATA_ROOT:-/tmp/docker-data}
DOCKERD_LOG=${DOCKERD_LOG:-/tmp/lumina-dockerd.log}
ENGINE_WAIT_S=${ENGINE_WAIT_S:-60}

cannot() { echo "ensure_engine: $*" >&2; exit 3; }

command -v "$CONTAINER_ENGINE" >/dev/null 2>&1 || cannot "$CONTAINER_ENGINE CLI not found"
info() { timeout 20 "$CONTAINER_ENGINE" info >/dev/null 2>&1; }
info && exit 0

[[ "$CONTAINER_ENGINE" == docker ]] || cannot "'$CONTAINER_ENGINE info' fails"
[[ $(id -u) -eq 0 ]] || cannot "'docker info' fails and dockerd cannot be started without root"
command -v dockerd >/dev/null 2>&1 || cannot "'docker info' fails and dockerd is not installed (apt-get install -y docker.io)"

mkdir -p "$DOCKER_DATA_ROOT"
echo "ensure_engine: starting dockerd --data-root $DOCKER_DATA_ROOT (log $DOCKERD_LOG)" >&2
setsid nohup dockerd --data-root "$DOCKER_DATA_ROOT" >"$DOCKERD_LOG" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$DOCKER_DATA_ROOT/dockerd.pid"
for _ in $(seq 1 "$ENGINE_WAIT_S"); do
  info && { echo "ensure_engine: dockerd ready (pid $pid)" >&2; exit 0; }
  kill -0 "$pid" 2>/dev/null || break
  sleep 1
done
tail -n 15 "$DOCKERD_LOG" >&2
cannot "dockerd did not become ready within ${ENGINE_WAIT_S}s (log above)"
