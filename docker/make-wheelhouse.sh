#!/usr/bin/env bash
# Download every package of a lock variant into a folder, for builds without an index.
#   docker/make-wheelhouse.sh cpu build/wheelhouse
# Run it with the Python the image uses (the CPU test image: Debian bookworm's 3.11, like CI's).
set -euo pipefail
variant="${1:?usage: make-wheelhouse.sh cpu|gpu DIR}"
dir="${2:?usage: make-wheelhouse.sh cpu|gpu DIR}"
lock="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lock"
mkdir -p "$dir"
stamp="$dir/.complete-$variant"
if [[ -f "$stamp" ]]; then echo "wheelhouse $dir ($variant) is complete"; exit 0; fi
python3 -m pip download --disable-pip-version-check -q -d "$dir" -r "$lock/$variant.txt" -c "$lock/common.txt"
python3 -m pip download --disable-pip-version-check -q --no-deps -d "$dir" -r "$lock/common.txt" -r "$lock/build.txt"
for extra in ${EXTRAS:-}; do  # the image extras, for builds without an index (EXTRAS="wandb galore")
    python3 -m pip download --disable-pip-version-check -q -d "$dir" -c "$lock/common.txt" -r "$lock/extras/$extra.txt"
done
touch "$stamp"
echo "wheelhouse $dir ($variant): $(ls "$dir" | wc -l) files, $(du -sh "$dir" | cut -f1)"
