#!/usr/bin/env bash
# Stages the GPU check for the GPU machine: builds `cuda_bench` with deploy/cuda/build.sh and
# writes it, stripped and gzipped (about 15 MB), to .cuda/cuda_bench.gz in the repo, a folder
# git ignores locally (.git/info/exclude) so that it travels only when named.
#
#   deploy/cuda/stage.sh             then, on the GPU machine: deploy/cuda/gpu-check.sh OUTDIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
"$here/build.sh" --example cuda_bench
target="${CARGO_TARGET_DIR:-${TIDAL_CACHE:-$HOME/.cache/tidal}/target/$(rustc --version | cut -d' ' -f2)}"
mkdir -p "$repo/.cuda"
grep -qx '/.cuda/' "$repo/.git/info/exclude" 2>/dev/null || echo '/.cuda/' >>"$repo/.git/info/exclude"
strip -o "$repo/.cuda/cuda_bench" "$target/release/examples/cuda_bench"
gzip -f "$repo/.cuda/cuda_bench"
echo "staged $(du -h "$repo/.cuda/cuda_bench.gz" | cut -f1) at .cuda/cuda_bench.gz"
