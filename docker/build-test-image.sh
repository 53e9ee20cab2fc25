#!/usr/bin/env bash
# Build the CPU test image from the project's Dockerfile, on the locally made base and a local
# wheelhouse, with no network during the build.
#   docker/build-test-image.sh [TAG]      (default ft-appliance:test)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tag="${1:-ft-appliance:test}"
base="ft-appliance-testbase:bookworm"
docker/make-test-base.sh "$base"
docker/make-wheelhouse.sh cpu build/wheelhouse
# Debian's client has BuildKit built in (RUN --mount); a newer client on PATH may need buildx.
client=docker
[[ -x /usr/bin/docker ]] && client=/usr/bin/docker
DOCKER_BUILDKIT=1 "$client" build --network none --progress plain \
    --build-arg BASE_IMAGE="$base" --build-arg VARIANT=cpu -t "$tag" . >build/test-image.log 2>&1 \
    || { tail -40 build/test-image.log >&2; exit 1; }
docker image inspect "$tag" --format "image $tag: {{.Size}} bytes"
