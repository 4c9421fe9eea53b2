#!/usr/bin/env bash
# Writes DIR/libcuda.so: a link-time stand-in for the CUDA driver, with every driver entry
# point that the locked cudarc declares as an empty function, under the driver's soname
# (libcuda.so.1), so the binary loads the GPU machine's real driver at run time.
#
#   deploy/cuda/driver-stub.sh DIR
set -euo pipefail
dir=${1:?usage: driver-stub.sh DIR}
repo=$(cd "$(dirname "$0")/../.." && pwd)

# cudarc's own source, at the version Cargo.lock pins (cargo metadata fetches it).
manifest=$(cd "$repo" && cargo metadata --format-version 1 --locked --features tidal-worker/cuda 2>/dev/null |
  python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')
bindings="$(dirname "$manifest")/src/driver/sys/mod.rs"
[ -f "$bindings" ] || { echo "driver-stub: no cudarc driver bindings at $bindings" >&2; exit 1; }

src=$(mktemp --suffix .c)
trap 'rm -f "$src"' EXIT
grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$bindings" | sed 's/^pub unsafe fn //' | sort -u |
  sed 's/.*/void &(void) {}/' >"$src"
count=$(wc -l <"$src")
[ "$count" -gt 100 ] || { echo "driver-stub: only $count entry points found in $bindings" >&2; exit 1; }
mkdir -p "$dir"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$dir/libcuda.so" "$src"
echo "driver-stub: $count entry points from $(basename "$(dirname "$manifest")") in $dir/libcuda.so"
