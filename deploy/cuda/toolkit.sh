#!/usr/bin/env bash
# Assembles the CUDA toolkit pieces that building the worker with `--features cuda` needs,
# from NVIDIA's wheels on PyPI, into $HOME/.cache/tidal/cuda/<version>/ (built once per
# version). No system CUDA and no GPU are needed to build; the GPU machine brings its driver.
#
#   deploy/cuda/toolkit.sh        prints the toolkit's root (assembling it on a miss)
#
# Pinned to CUDA 13.0: the GPU machines this project is lent run driver 580 (CUDA 13.0), and
# PTX from a newer nvcc would not load there. The 12.x wheels carry no nvcc, only ptxas.
set -euo pipefail

CUDA_PINS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)
key=$(printf '%s\n' "${CUDA_PINS[@]}" | sha256sum | cut -c1-12)
cache="${TIDAL_CACHE:-$HOME/.cache/tidal}/cuda/13.0-$key"
root="$cache/site/nvidia/cu13"

if [ -f "$cache/.done" ]; then
  echo "$root"
  exit 0
fi

here=$(cd "$(dirname "$0")" && pwd)
echo "cuda toolkit: installing ${#CUDA_PINS[@]} wheels from PyPI into $cache (about 700 MB, once)" >&2
rm -rf "$cache"
mkdir -p "$cache"
python3 -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps \
  --target "$cache/site" "${CUDA_PINS[@]}" >&2

# The wheels ship versioned libraries only; the linker's -lcublas wants the plain name.
for lib in "$root"/lib/lib*.so.*; do
  base=$(basename "$lib")
  plain="${base%%.so.*}.so"
  [ -e "$root/lib/$plain" ] || ln -s "$base" "$root/lib/$plain"
done

# cudarc links libcuda (the driver) by name. The driver is not on PyPI, so build the same
# kind of link-time stub the CUDA toolkit ships in lib/stubs: every driver entry point cudarc
# declares, as an empty function, under the driver's soname. At run time the GPU machine's
# real libcuda.so.1 is loaded instead.
mkdir -p "$root/lib/stubs"
"$here/driver-stub.sh" "$root/lib/stubs" >&2

touch "$cache/.done"
echo "cuda toolkit: ready at $root" >&2
echo "$root"
