#!/usr/bin/env bash
# Build the local base image for container tests (no registry is reachable here):
# Debian bookworm with Python 3.11, venv, pip and tini, imported into the local engine.
#   docker/make-test-base.sh [IMAGE]     (default ft-appliance-testbase:bookworm; skipped if present)
set -euo pipefail
image="${1:-ft-appliance-testbase:bookworm}"
if docker image inspect "$image" >/dev/null 2>&1; then
    echo "base image $image exists"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
root="$(mktemp -d /tmp/ft-testbase.XXXXXX)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,tini \
    bookworm "$root" >/tmp/ft-testbase-debootstrap.log 2>&1 \
    || { tail -20 /tmp/ft-testbase-debootstrap.log >&2; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import - "$image" >/dev/null
echo "base image $image built"
