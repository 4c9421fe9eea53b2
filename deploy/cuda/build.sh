#!/usr/bin/env bash
# Builds the worker for NVIDIA GPUs: `cargo build --release -p tidal-worker --features cuda`
# against the PyPI CUDA toolkit that deploy/cuda/toolkit.sh assembles. Needs no GPU and no
# system CUDA. Not part of every CI run: candle's kernels take a long nvcc pass on a cold cache.
#
#   deploy/cuda/build.sh [extra cargo args]      e.g. --example bench
#
# TIDAL_CUDA_COMPUTE_CAP picks the GPU generation the kernels are compiled for (default 90:
# Hopper, H100/H200; 80 for A100, 89 for L4/L40S). The binary lands in
# $CARGO_TARGET_DIR/release/tidal-worker and needs, at run time, the driver (libcuda.so.1)
# and libcublas/libcublasLt/libcurand/libnvrtc 13 on LD_LIBRARY_PATH (the toolkit's lib/
# folder here, or the nvidia-* wheels a GPU machine's Python already has).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

root=$("$here/toolkit.sh")
export PATH="$root/bin:$PATH"
export CUDA_HOME="$root"
export CUDA_COMPUTE_CAP="${TIDAL_CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$root/lib:$root/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${TIDAL_CACHE:-$HOME/.cache/tidal}/target/$(rustc --version | cut -d' ' -f2)}"

echo "cuda build: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), sm_$CUDA_COMPUTE_CAP, target dir $CARGO_TARGET_DIR" >&2
echo "cuda build: candle's kernels compile with nvcc first (tens of minutes on 2 cores, once per cap)" >&2
cd "$repo"
cargo build --release --locked -p tidal-worker --features cuda "$@"
