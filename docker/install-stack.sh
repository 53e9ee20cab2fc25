#!/usr/bin/env bash
# Install the pinned stack into the active Python environment.
#   docker/install-stack.sh cpu|gpu [extra pip args...]
# The one installer for the image, the Makefile and CI, so all of them use the same pins.
set -euo pipefail

variant="${1:?usage: install-stack.sh cpu|gpu [pip args]}"
shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
lock="$here/lock"
pip=(python -m pip install --disable-pip-version-check)

# 1. The torch pair, resolved with its own dependencies (CUDA libraries for gpu).
"${pip[@]}" "$@" -c "$lock/common.txt" -r "$lock/$variant.txt"
# 2. Everything else, fully pinned, without a second resolver pass pulling extras.
DS_BUILD_OPS=0 "${pip[@]}" "$@" --no-deps --no-build-isolation -r "$lock/common.txt"

# 3. Extras the image does not carry by default (EXTRAS="wandb galore", docker/lock/extras/NAME.txt):
#    each pinned at the top level, its own dependencies resolved under the lock's pins.
for extra in ${EXTRAS:-}; do
    file="$lock/extras/$extra.txt"
    [[ -f "$file" ]] || { echo "unknown extra '$extra': one of $(ls "$lock/extras" | sed 's/\.txt$//' | tr '\n' ' ')" >&2; exit 2; }
    "${pip[@]}" "$@" -c "$lock/common.txt" -r "$file"
done

if [[ "$variant" == cpu ]]; then
    # PyPI's torchaudio wheel links CUDA torch libraries; beside a CPU torch its native extension
    # cannot load. Without it torchaudio imports in pure-Python mode, which is all llamafactory's
    # import of it needs on the text path.
    site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    rm -f "$site"/torchaudio/lib/*.so
fi
python -c "import torch, torchaudio, transformers, llamafactory; print('stack ok: torch', torch.__version__, 'transformers', transformers.__version__, 'llamafactory', llamafactory.__version__)"
