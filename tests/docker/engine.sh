#!/usr/bin/env bash
# A Docker engine and a local Debian base image with Python, for tests/docker (make test-docker).
# Root only: installs Debian's docker.io and debootstrap, starts dockerd if none answers, and makes
# the base image (no registry is needed: debootstrap from the apt mirror, then `docker import`).
#
#   tests/docker/engine.sh            ->  prints the base image's name (localbase:bookworm-py)
set -euo pipefail

BASE=localbase:bookworm-py
if [[ $(id -u) != 0 ]]; then
    echo "tests/docker/engine.sh needs root (apt-get, dockerd)" >&2
    exit 1
fi
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >&2
fi
if ! docker info >/dev/null 2>&1; then
    log=$(mktemp /tmp/dockerd.XXXXXX.log)
    nohup dockerd --iptables=false --bridge=none >"$log" 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { cat "$log" >&2; exit 1; }
fi
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    rootfs=$(mktemp -d /tmp/rootfs.XXXXXX)
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" >&2
    tar -C "$rootfs" -c . | docker import - "$BASE" >&2
    rm -rf "$rootfs"
fi
echo "$BASE"
