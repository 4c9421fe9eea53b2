#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and driver: runs the staged cuda_bench (deploy/cuda/stage.sh)
# against the CUDA 13 libraries found there (the nvidia-* wheels of its Python, or a system
# CUDA), writing its report to OUTDIR/cuda_bench.md. Exit code 1: the GPU path disagreed with
# the CPU path.
#
#   deploy/cuda/gpu-check.sh OUTDIR
set -euo pipefail
out=${1:?usage: gpu-check.sh OUTDIR}
repo=$(cd "$(dirname "$0")/../.." && pwd)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

libdirs=""
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
  found=$(find / -xdev -name "$lib" -not -path '*/proc/*' 2>/dev/null | head -1)
  [ -n "$found" ] || { echo "gpu-check: $lib not found on this machine" >&2; exit 2; }
  libdirs="$libdirs:$(dirname "$found")"
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

bin=/tmp/cuda_bench
gunzip -c "$repo/.cuda/cuda_bench.gz" >"$bin"
chmod +x "$bin"
"$bin" --out "$out/cuda_bench.md" 2>&1 | tee "$out/cuda_bench.log"
