#!/usr/bin/env bash
# Builds Tidal's images without a container daemon, from the inputs the Containerfile uses
# (base-packages.txt, rootfs.sh, the release binaries, the same labels), and pushes them to the
# local cluster's registry. An image is a base layer (Debian packages, cached by their
# versions), one layer with the binary, and a config (entrypoint, non-root user, labels) set
# with crane (go-containerregistry).
#
#   build.sh local-cluster   pause, CoreDNS and toolbox images the real nodes need
#   build.sh tidal           tidal-operator and tidal-worker (cargo build first; the profile is
#                            $TIDAL_IMAGE_PROFILE, default release)
#   build.sh model DIR REPO:TAG
#                            a model directory (config.json, *.safetensors, tokenizer.json) as
#                            an OCI artifact for `model.uri: oci://...` (mounted as an image
#                            volume); pushed as $REGISTRY/REPO:TAG
#   build.sh toolbox         a small image for in-cluster checks: busybox's shell and probe
#                            (deploy/local/tools/probe: DNS lookups and HTTP calls)
#   build.sh sizes           print each image's compressed size
#
# Images are pushed as $REGISTRY/<path>; the nodes' containerd resolves ghcr.io through the
# same registry (a mirror), so ghcr.io/tidal-rs/tidal-worker:<appVersion> — the chart's default
# — is pulled from here.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=../local/lib.sh
. "$ROOT/deploy/local/lib.sh"
REGISTRY=${TIDAL_REGISTRY:-127.0.0.1:${TIDAL_REGISTRY_PORT:-25000}}
WORK=$TIDAL_CACHE/images
APP_VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$ROOT/charts/tidal/Chart.yaml")
REVISION=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
# crane, quiet unless it fails (it logs every push).
crane() {
  local out rc=0
  out=$("$CRANE_BIN/crane" "$@" 2>&1) || rc=$?
  if [ "$rc" != 0 ]; then
    printf 'crane %s failed:\n%s\n' "$1" "$out" >&2
    return "$rc"
  fi
  # Only what the caller asked for (manifests, configs) goes to stdout.
  grep -v '^[0-9]\{4\}/[0-9][0-9]/[0-9][0-9] ' <<<"$out" || true
}

# The runtime base layer, cached by the exact package versions (and rootfs.sh).
base_layer() {
  mkdir -p "$WORK/debs"
  local pkgs key out
  pkgs=$(grep -v '^#' "$HERE/base-packages.txt" | xargs)
  # shellcheck disable=SC2086
  if ! versions=$(apt-cache policy $pkgs 2>/dev/null | awk '/^[a-z]/{p=$1} /Candidate:/{print p $2}') ||
    grep -q '(none)' <<<"$versions" || [ -z "$versions" ]; then
    log "apt-get update (package lists for the image base)"
    apt-get update -qq
    # shellcheck disable=SC2086
    versions=$(apt-cache policy $pkgs | awk '/^[a-z]/{p=$1} /Candidate:/{print p $2}')
  fi
  key=$({ echo "$versions"; cat "$HERE/rootfs.sh"; } | sha256sum | cut -c1-16)
  out=$WORK/base-$key.tar
  if [ ! -f "$out" ]; then
    log "building the image base from Debian packages: $pkgs"
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2086
    (cd "$WORK/debs" && apt-get download -qq -o APT::Sandbox::User=root $pkgs)
    local debs=()
    for p in $pkgs; do debs+=("$(ls -t "$WORK/debs/${p}"_*.deb | head -n1)"); done
    sh "$HERE/rootfs.sh" "$tmp/rootfs" "${debs[@]}"
    tar_dir "$tmp/rootfs" "$out.tmp" && mv "$out.tmp" "$out"
    rm -rf "$tmp"
  fi
  echo "$out"
}

# tar_dir DIR OUT: a reproducible layer (sorted, fixed times, numeric owners kept).
tar_dir() {
  tar --sort=name --mtime=@0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$1" -cf "$2" .
}

# layer_with OUT PATH_IN_IMAGE FILE [MODE]: a layer holding one file (debug info stripped).
layer_with() {
  local tmp
  tmp=$(mktemp -d)
  install -D -m "${4:-0755}" "$3" "$tmp/rootfs$2"
  strip --strip-debug "$tmp/rootfs$2" 2>/dev/null || true
  tar_dir "$tmp/rootfs" "$1"
  rm -rf "$tmp"
}

# sbom_layer OUT PACKAGE: a layer holding the SPDX 2.3 SBOM of a workspace package's dependency
# graph (cargo-sbom, from Cargo.lock) at /usr/share/doc/PACKAGE/sbom.spdx.json. Its creation
# time and namespace come from the commit, so the same commit gives the same layer.
sbom_layer() {
  local out=$1 pkg=$2 tmp
  "$ROOT/deploy/local/build.sh" cargo-sbom
  tmp=$(mktemp -d)
  "$CARGO_SBOM_BIN/cargo-sbom" --project-directory "$ROOT" --cargo-package "$pkg" \
    --output-format spdx_json_2_3 >"$tmp/raw.json"
  python3 - "$tmp/raw.json" "$tmp/sbom.spdx.json" "$pkg" "$APP_VERSION" "$REVISION" <<'PY'
import json, sys
raw, out, pkg, version, revision = sys.argv[1:]
doc = json.load(open(raw))
doc["name"] = f"{pkg}-{version}"
doc["documentNamespace"] = f"https://github.com/tidal-rs/tidal/sbom/{pkg}/{revision}"
doc["creationInfo"]["created"] = "1970-01-01T00:00:00Z"
json.dump(doc, open(out, "w"), indent=1, sort_keys=True)
PY
  layer_with "$out" "/usr/share/doc/$pkg/sbom.spdx.json" "$tmp/sbom.spdx.json" 0644
  rm -rf "$tmp"
}

# image REF LAYER... -- MUTATE_FLAGS...: pushes REF made of the layers, with its config set.
image() {
  local ref=$1; shift
  local layers=()
  while [ "$1" != "--" ]; do layers+=(-f "$1"); shift; done
  shift
  crane append --insecure --oci-empty-base "${layers[@]}" -t "$ref" >/dev/null
  crane mutate --insecure "$ref" --set-platform linux/amd64 \
    --label "org.opencontainers.image.created=1970-01-01T00:00:00Z" \
    --label "org.opencontainers.image.revision=$REVISION" \
    --label "org.opencontainers.image.source=https://github.com/tidal-rs/tidal" \
    --label "org.opencontainers.image.licenses=Apache-2.0" \
    --label "org.opencontainers.image.vendor=Tidal" \
    "$@" -t "$ref" >/dev/null
  log "pushed $ref"
}

# present REF: the registry has it already.
present() { crane manifest --insecure "$1" >/dev/null 2>&1; }

build_local_cluster() {
  build_toolbox
  local pause=$REGISTRY/tidal-local/pause:$PAUSE_VERSION
  local coredns=$REGISTRY/tidal-local/coredns:$COREDNS_VERSION
  if ! present "$pause"; then
    # The sandbox image, from Kubernetes' own pause.c (in the k8s.io/kubernetes module).
    local src tmp
    src=$(cd "$ROOT/deploy/local/tools/kubernetes" &&
      go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    tmp=$(mktemp -d)
    cc -Os -Wall -static -DVERSION="v$PAUSE_VERSION" -o "$tmp/pause" "$src/build/pause/linux/pause.c"
    layer_with "$tmp/pause.tar" /pause "$tmp/pause"
    image "$pause" "$tmp/pause.tar" -- --entrypoint /pause --user 65535:65535 \
      --label "org.opencontainers.image.title=pause" \
      --label "org.opencontainers.image.version=$PAUSE_VERSION"
    rm -rf "$tmp"
  fi
  if ! present "$coredns"; then
    local base tmp
    base=$(base_layer)
    tmp=$(mktemp -d)
    layer_with "$tmp/coredns.tar" /usr/local/bin/coredns "$COREDNS_BIN/coredns"
    image "$coredns" "$base" "$tmp/coredns.tar" -- --entrypoint /usr/local/bin/coredns \
      --user 65532:65532 --label "org.opencontainers.image.title=coredns" \
      --label "org.opencontainers.image.version=$COREDNS_VERSION"
    rm -rf "$tmp"
  fi
}

# The ghcr.io names the chart defaults to, under the local registry (its mirror).
tidal_ref() { echo "$REGISTRY/tidal-rs/$1:$APP_VERSION"; }

build_tidal() {
  local profile=${TIDAL_IMAGE_PROFILE:-release} target_dir
  target_dir=${CARGO_TARGET_DIR:-$ROOT/target}
  if [ "$profile" = dev ]; then
    # What `cargo test --workspace` builds (the same features): a no-op after the tests.
    log "cargo test --workspace --no-run (the binaries the tests use; cold: many minutes)"
    (cd "$ROOT" && cargo test --workspace --no-run --locked --quiet)
  else
    log "cargo build --profile $profile -p tidal-operator -p tidal-worker (cold: many minutes)"
    (cd "$ROOT" && cargo build --locked --profile "$profile" -p tidal-operator -p tidal-worker \
      --bin tidal-operator --bin tidal-worker)
  fi
  local dir=$target_dir/$profile
  [ "$profile" = dev ] && dir=$target_dir/debug
  local base tmp
  base=$(base_layer)
  tmp=$(mktemp -d)
  layer_with "$tmp/operator.tar" /usr/local/bin/tidal-operator "$dir/tidal-operator"
  layer_with "$tmp/worker.tar" /usr/local/bin/tidal-worker "$dir/tidal-worker"
  sbom_layer "$tmp/operator-sbom.tar" tidal-operator
  sbom_layer "$tmp/worker-sbom.tar" tidal-worker
  image "$(tidal_ref tidal-operator)" "$base" "$tmp/operator.tar" "$tmp/operator-sbom.tar" -- \
    --entrypoint /usr/local/bin/tidal-operator --cmd run --user 65532:65532 --workdir /home/tidal \
    --label "org.opencontainers.image.title=tidal-operator" \
    --label "org.opencontainers.image.version=$APP_VERSION" \
    --label "org.opencontainers.image.description=Tidal's Kubernetes operator: InferenceService and EdgeNode controllers, autoscaler"
  image "$(tidal_ref tidal-worker)" "$base" "$tmp/worker.tar" "$tmp/worker-sbom.tar" -- \
    --entrypoint /usr/local/bin/tidal-worker --cmd serve --user 65532:65532 --workdir /home/tidal \
    --exposed-ports 8080 \
    --label "org.opencontainers.image.title=tidal-worker" \
    --label "org.opencontainers.image.version=$APP_VERSION" \
    --label "org.opencontainers.image.description=Tidal's candle-based LLM server (full, router, expert and edge roles)"
  rm -rf "$tmp"
  forget_on_nodes "ghcr.io/tidal-rs/tidal-operator:$APP_VERSION" "ghcr.io/tidal-rs/tidal-worker:$APP_VERSION" \
    "$(tidal_ref tidal-operator)" "$(tidal_ref tidal-worker)"
}

# forget_on_nodes REF...: running real nodes drop their copies of REF. The chart's images keep
# the app version's tag across rebuilds and are pulled IfNotPresent, so a node that pulled an
# earlier build would go on starting it; without its copy the next pod pulls this one.
forget_on_nodes() {
  local sock ref
  for sock in "$TIDAL_LOCAL_STATE"/nodes/*/containerd.sock; do
    [ -S "$sock" ] || continue
    for ref in "$@"; do
      "$CONTAINERD_BIN/ctr" --address "$sock" -n k8s.io images rm "$ref" >/dev/null 2>&1 || true
    done
    log "$(basename "$(dirname "$sock")"): dropped its copies of the previous tidal images"
  done
}

# model DIR REPO:TAG: the files at the image's root, so the volume's mount point is the
# checkpoint directory.
push_model() {
  local dir=$1 ref=$REGISTRY/$2 tmp
  [ -f "$dir/config.json" ] || { log "$dir has no config.json"; exit 1; }
  tmp=$(mktemp -d)
  mkdir -p "$tmp/rootfs"
  cp -a "$dir"/. "$tmp/rootfs/"
  chmod -R a+rX "$tmp/rootfs"
  tar_dir "$tmp/rootfs" "$tmp/model.tar"
  image "$ref" "$tmp/model.tar" -- --label "org.opencontainers.image.title=$(basename "${2%%:*}")" \
    --label "org.opencontainers.image.description=model checkpoint (Hugging Face layout) for Tidal"
  rm -rf "$tmp"
}

build_toolbox() {
  local ref=$REGISTRY/tidal-local/toolbox:3 tmp deb
  present "$ref" && return 0
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root busybox-static 2>/dev/null ||
    { apt-get update -qq && apt-get download -qq -o APT::Sandbox::User=root busybox-static; })
  deb=$(ls "$tmp"/busybox-static_*.deb)
  dpkg-deb -x "$deb" "$tmp/pkg"
  mkdir -p "$tmp/rootfs/bin" "$tmp/rootfs/tmp"
  install -m 0755 "$tmp/pkg/bin/busybox" "$tmp/rootfs/bin/busybox"
  for a in sh sleep cat echo; do ln -s busybox "$tmp/rootfs/bin/$a"; done
  # The client: busybox's wget and nslookup go through static glibc's NSS, which crashes in
  # pods; probe is pure Go (its own resolver), static, from deploy/local/tools/probe.
  (cd "$ROOT/deploy/local/tools/probe" &&
    CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$tmp/rootfs/bin/probe" .)
  chmod 1777 "$tmp/rootfs/tmp"
  tar_dir "$tmp/rootfs" "$tmp/toolbox.tar"
  image "$ref" "$tmp/toolbox.tar" -- --entrypoint /bin/sh --user 65532:65532 \
    --label "org.opencontainers.image.title=toolbox" \
    --label "org.opencontainers.image.description=busybox's shell and Tidal's probe client, for in-cluster checks"
  rm -rf "$tmp"
}

sizes() {
  local r
  for r in "$(tidal_ref tidal-operator)" "$(tidal_ref tidal-worker)" \
    "$REGISTRY/tidal-local/coredns:$COREDNS_VERSION" "$REGISTRY/tidal-local/pause:$PAUSE_VERSION"; do
    present "$r" || continue
    crane manifest --insecure "$r" |
      python3 -c 'import json,sys; m=json.load(sys.stdin); print(sum(l["size"] for l in m["layers"]))' |
      awk -v r="$r" '{printf "%-60s %6.1f MB compressed\n", r, $1/1e6}'
  done
}

case "${1:-}" in
  local-cluster) build_local_cluster ;;
  tidal) build_tidal ;;
  model) push_model "$2" "$3" ;;
  toolbox) build_toolbox ;;
  sizes) sizes ;;
  *) sed -n '2,21p' "$0" >&2; exit 2 ;;
esac
