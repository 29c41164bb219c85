#!/usr/bin/env bash
# CI's compose step: build the images and run the stack of docker-compose.yml for real, with
# docker-compose.test.yml swapping in what this machine can build (no image registry, no GPU).
#   scripts/compose-test.sh [pytest options]
#
# Installs docker.io, debootstrap and docker-compose (Debian packages) if missing, starts dockerd with
# the vfs storage driver if no engine answers, makes a Debian base image with debootstrap and a wheelhouse
# with a CPU torch on the host, builds the segq, redis and postgres images from them, then runs
# tests/compose. Cached in .compose-cache/ (git-ignored): the base image's tarball and the wheelhouse.
# Any step that fails, the engine's start included, fails the script: it never skips.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
PY=${PYTHON:-python3}
CACHE=${SEGQ_COMPOSE_CACHE:-$PWD/.compose-cache}
DOCKER_ROOT=${SEGQ_DOCKERD_DIR:-/tmp/segq-dockerd}
TORCH_VERSION=${SEGQ_TORCH_VERSION:-2.13.0}
BASE=segq-test/debian:bookworm
mkdir -p "$CACHE"

step() { echo "compose-test: [$(( $(date +%s) - started ))s] $*"; }
fail() { echo "compose-test: FAILED: $*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

install_tools() {
  local missing=()
  have dockerd || missing+=(docker.io)
  have debootstrap || missing+=(debootstrap)
  have docker-compose || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
  [ ${#missing[@]} = 0 ] && return
  [ "$(id -u)" = 0 ] || fail "install ${missing[*]} (apt-get install ${missing[*]}), then run again"
  step "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
}

start_engine() {
  docker info >/dev/null 2>&1 && return
  step "starting dockerd (vfs) in $DOCKER_ROOT"
  mkdir -p "$DOCKER_ROOT"
  dockerd --storage-driver vfs --data-root "$DOCKER_ROOT/root" --exec-root "$DOCKER_ROOT/exec" \
    --pidfile "$DOCKER_ROOT/pid" >"$DOCKER_ROOT/log" 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return; sleep 1; done
  tail -20 "$DOCKER_ROOT/log" >&2 || true
  fail "the container engine did not start within 60 s (log: $DOCKER_ROOT/log)"
}

# Debian bookworm (python 3.11, like the wheels made here) with a venv on PATH, so the Dockerfile's
# `pip install` runs as it does on python:3.11-slim; policy-rc.d keeps packages from starting daemons.
base_image() {
  docker image inspect "$BASE" >/dev/null 2>&1 && return
  local tarball=$CACHE/debian-bookworm.tar
  if [ ! -s "$tarball" ]; then
    step "debootstrap: Debian bookworm with python3"
    local rootfs
    rootfs=$(mktemp -d /tmp/segq-rootfs.XXXXXX)
    chmod 755 "$rootfs"   # it becomes the image's /: mktemp's 0700 would lock out every user but root
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
      http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 || fail "debootstrap (log: $CACHE/debootstrap.log)"
    printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d" && chmod +x "$rootfs/usr/sbin/policy-rc.d"
    chroot "$rootfs" python3 -m venv /opt/venv
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf "$rootfs"
  fi
  step "importing $BASE"
  docker import --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' "$tarball" "$BASE" >/dev/null
}

# Every wheel the image installs, resolved here (pip's constraints and local wheels included); the
# stamp makes a change of pyproject.toml or of the torch version rebuild it.
wheelhouse() {
  local stamp extras
  extras=$(grep -o '"\.\[[a-z,]*\]"' Dockerfile | head -1 | tr -d '"')   # the extras the image installs
  [ -n "$extras" ] || fail "no \".[extras]\" install line in the Dockerfile"
  stamp=$( (cat pyproject.toml; echo "$TORCH_VERSION $extras") | sha256sum | cut -c1-16)
  [ -f "$CACHE/wheels/.stamp-$stamp" ] && return
  step "wheelhouse: torch==$TORCH_VERSION (CPU) and segq's dependencies"
  rm -rf "$CACHE/wheels"
  # async-timeout: redis needs it below python 3.11.3, and Debian's python is 3.11.2 (this host's may be newer).
  "$PY" -m pip wheel -q --wheel-dir "$CACHE/wheels" "torch==$TORCH_VERSION" setuptools wheel "async-timeout>=4.0.3" \
    "$extras" 2>&1 | grep -v "is ignored: it is neither" || true
  ls "$CACHE"/wheels/torch-"$TORCH_VERSION"* >/dev/null || fail "no torch $TORCH_VERSION wheel in $CACHE/wheels"
  rm -f "$CACHE"/wheels/segq-*.whl
  touch "$CACHE/wheels/.stamp-$stamp"
}

# The wheelhouse over HTTP on the loopback: the image build (host network) reads it without a copy of
# the wheels in a layer, which the vfs driver would store in full.
# A fixed port: the address is part of a build argument, and a new one would rebuild the torch layer.
serve_wheels() {
  wheel_port=${SEGQ_WHEEL_PORT:-18473}
  "$PY" -c "import socket; socket.create_server(('127.0.0.1', $wheel_port)).close()" 2>/dev/null \
    || fail "port $wheel_port is taken: set SEGQ_WHEEL_PORT to a free port for the wheelhouse server"
  "$PY" -m http.server --bind 127.0.0.1 --directory "$CACHE/wheels" "$wheel_port" >/dev/null 2>&1 &
  wheel_server=$!
  trap 'kill $wheel_server 2>/dev/null || true' EXIT
  for _ in $(seq 50); do "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$wheel_port/')" \
    2>/dev/null && return; sleep 0.1; done
  fail "the wheelhouse server did not start"
}

# BuildKit snapshots only RUN and COPY steps; the classic builder copies the whole image for every step,
# a minute each under vfs once torch is in. Debian's docker.io client (20.10) has BuildKit built in;
# newer clients need the buildx plugin. Without either, the classic builder.
build_client() {
  build=(env DOCKER_BUILDKIT=0 docker)
  if docker buildx version >/dev/null 2>&1; then build=(env DOCKER_BUILDKIT=1 docker); return; fi
  local client major
  for client in $(type -ap docker); do
    major=$("$client" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)
    if [ -n "$major" ] && [ "$major" -lt 23 ]; then build=(env DOCKER_BUILDKIT=1 "$client"); return; fi
  done
}

build_images() {
  build_client
  step "building segq:test (${build[*]})"
  "${build[@]}" build -q --network host -t segq:test --build-arg BASE_IMAGE="$BASE" \
    --build-arg TORCH_SPEC="torch==$TORCH_VERSION" \
    --build-arg PIP_ARGS="--no-index --find-links http://127.0.0.1:$wheel_port/" . >/dev/null
  for service in redis postgres; do
    step "building segq-test/$service"
    "${build[@]}" build -q --network host -t "segq-test/$service" --build-arg BASE_IMAGE="$BASE" \
      -f "docker/test/$service.Dockerfile" docker/test >/dev/null
  done
  docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^(segq|segq-test/)' | sed 's/^/  /'
}

install_tools
start_engine
step "engine: $(docker version --format 'server {{.Server.Version}}')"
base_image
wheelhouse
serve_wheels
build_images
scripts/services.sh >/dev/null   # a local Redis for the same dataset run outside containers
step "running tests/compose"
status=0
"$PY" -m pytest tests/compose -q -ra -p no:cacheprovider "$@" || status=$?
step "done (pytest exit $status)"
exit $status
