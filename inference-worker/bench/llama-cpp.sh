#!/usr/bin/env bash
# llama.cpp for the batch-1 comparison in quant_bench: llama-cpp-python from PyPI, compiled
# here by pip (cmake + g++; no binary is downloaded), in a virtualenv under
# $HOME/.cache/tidal/llama-cpp-python/<version>/ built once. Prints the venv's python.
#
#   PY=$(inference-worker/bench/llama-cpp.sh)
set -euo pipefail
version=0.3.16
venv="${TIDAL_CACHE:-$HOME/.cache/tidal}/llama-cpp-python/$version"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  echo "$venv/bin/python"
  exit 0
fi
echo "llama.cpp: compiling llama-cpp-python==$version with pip into $venv (cmake, several minutes, once)" >&2
rm -rf "$venv"
python3 -m venv "$venv"
# Native CPU kernels (AVX2/FMA where the CPU has them), as a local llama.cpp build has.
CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-binary llama-cpp-python \
  "llama-cpp-python==$version" >&2
"$venv/bin/python" -c 'import llama_cpp; print("llama.cpp: ready,", llama_cpp.__version__)' >&2
echo "$venv/bin/python"
