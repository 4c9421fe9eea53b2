#!/usr/bin/env bash
# Builds the local control plane's binaries from their Go modules (tools/*/go.mod) into
# $HOME/.cache/tidal/bin/<name>-<version>-<go>/, skipping every tool already in the cache.
# Usage: build.sh [kubernetes|etcd|kwok|helm|cargo-deny|all] |
#        [kubernetes-node|containerd|cni|coredns|registry|crane|prometheus|cargo-sbom|nodes]
# `all` is the control plane; `nodes` what the real nodes need.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

# build_into DIR MODULE_DIR OUT LDFLAGS PKG...: build atomically (a half-built dir never counts);
# OUT is the binary's name, or "" to name each binary after its package.
build_into() {
  local dir=$1 mod=$2 out=$3 ldflags=$4; shift 4
  if [ -f "$dir/.complete" ]; then return 0; fi
  log "building $(basename "$dir") (cold builds take minutes; cached afterwards)"
  local tmp="$dir.tmp.$$"
  rm -rf "$tmp" && mkdir -p "$tmp"
  (cd "$LOCAL_DIR/tools/$mod" && go build -trimpath -ldflags "-s -w $ldflags" -o "$tmp/$out" "$@") &
  local pid=$! start=$SECONDS rc=0
  # A line every 30 s, so a cold build is never a silent wait.
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    if (((SECONDS - start) % 30 < 5)) && ((SECONDS - start >= 30)); then
      log "  still building $(basename "$dir"): $((SECONDS - start)) s"
    fi
  done
  wait "$pid" || rc=$?
  [ "$rc" = 0 ] || { rm -rf "$tmp"; log "building $(basename "$dir") failed"; return "$rc"; }
  rm -rf "$dir" && mv "$tmp" "$dir" && touch "$dir/.complete"
  log "built $(basename "$dir") in $((SECONDS - start)) s"
}

# mod_info MODULE_DIR MODULE@VERSION FIELD: a field of `go mod download -json`.
mod_field() {
  (cd "$LOCAL_DIR/tools/$1" && go mod download -json "$2") | sed -n "s/.*\"$3\": \"\(.*\)\".*/\1/p" | head -n1
}

# The same variables hack/lib/version.sh sets, so `kubectl version` prints the real version.
k8s_ldflags() {
  local v=${KUBERNETES_VERSION#v} commit date ld="" p
  commit=$(mod_field kubernetes "k8s.io/kubernetes@$KUBERNETES_VERSION" Hash)
  date=$(mod_field kubernetes "k8s.io/kubernetes@$KUBERNETES_VERSION" Time)
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=${v%%.*}"
    ld+=" -X $p.gitMinor=$(cut -d. -f2 <<<"$v") -X $p.gitCommit=${commit:-unknown}"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=${date:-1970-01-01T00:00:00Z}"
  done
  echo "$ld"
}

build_kubernetes() {
  build_into "$K8S_BIN" kubernetes "" "$(k8s_ldflags)" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
}

# kubelet and kube-proxy: the same module and version ldflags as the control plane, a separate
# cache dir (so adding them never invalidates the control plane's).
build_kubernetes_node() {
  build_into "$K8S_NODE_BIN" kubernetes "" "$(k8s_ldflags)" \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy
}

build_containerd() {
  local p=github.com/containerd/containerd/v2
  build_into "$CONTAINERD_BIN" containerd "" \
    "-X $p/version.Version=$CONTAINERD_VERSION -X $p/version.Package=$p" \
    $p/cmd/containerd $p/cmd/containerd-shim-runc-v2 $p/cmd/ctr
}

build_cni() {
  local p=github.com/containernetworking/plugins/plugins
  build_into "$CNI_BIN" cni "" \
    "-X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$CNI_PLUGINS_VERSION" \
    $p/main/bridge $p/main/loopback $p/ipam/host-local $p/meta/portmap
}

build_coredns() {
  build_into "$COREDNS_BIN" coredns coredns "" .
}

build_registry() {
  build_into "$REGISTRY_BIN" registry registry \
    "-X github.com/distribution/distribution/v3/version.version=$DISTRIBUTION_VERSION" \
    github.com/distribution/distribution/v3/cmd/registry
}

build_crane() {
  build_into "$CRANE_BIN" crane crane "" github.com/google/go-containerregistry/cmd/crane
}

# Only Kubernetes discovery (the tags of Prometheus' plugins/); no embedded web UI (its assets
# are built with npm, not in the module): the HTTP API, which the operator and tests use.
build_prometheus() {
  local v=github.com/prometheus/common/version
  GOFLAGS="$GOFLAGS -tags=remove_all_sd,enable_kubernetes_sd" \
    build_into "$PROMETHEUS_BIN" prometheus prometheus \
    "-X $v.Version=$PROMETHEUS_VERSION -X $v.Branch=HEAD -X $v.BuildUser=tidal-local" \
    github.com/prometheus/prometheus/cmd/prometheus
}

build_etcd() {
  local commit
  commit=$(mod_field etcd "go.etcd.io/etcd/server/v3@$ETCD_VERSION" Hash)
  build_into "$ETCD_BIN" etcd etcd "-X go.etcd.io/etcd/api/v3/version.GitSHA=${commit:0:9}" go.etcd.io/etcd/server/v3
}

build_kwok() {
  build_into "$KWOK_BIN" kwok kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok
  # kwok's stage definitions (how fake nodes and pods move through their lifecycle) ship in
  # its module source, not in the binary: copy them next to it for `kwok --config`.
  if [ ! -f "$KWOK_BIN/stages.yaml" ]; then
    local src f
    src=$(mod_field kwok "sigs.k8s.io/kwok@$KWOK_VERSION" Dir)
    for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
      pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
      echo "---"; cat "$src/kustomize/stage/$f"
    done >"$KWOK_BIN/stages.yaml.tmp"
    mv "$KWOK_BIN/stages.yaml.tmp" "$KWOK_BIN/stages.yaml"
  fi
}

build_helm() {
  build_into "$HELM_BIN" helm helm "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" helm.sh/helm/v3/cmd/helm
}

# A Rust tool from crates.io (`cargo install --locked`) into DIR, in its own target dir: never
# the workspace's (CARGO_TARGET_DIR) nor with CI's clippy wrapper.
# cargo_tool DIR CRATE VERSION [INSTALL_FLAGS...]
cargo_tool() {
  local dir=$1 crate=$2 version=$3; shift 3
  if [ -f "$dir/.complete" ]; then return 0; fi
  log "building $crate $version (a few minutes cold; cached afterwards)"
  local tmp="$dir.tmp.$$" start=$SECONDS rc=0
  rm -rf "$tmp" && mkdir -p "$tmp"
  # Tools, not products: a quick -O1 build without LTO instead of their release profile
  # (cold CI pays for each of these once).
  (unset RUSTC_WORKSPACE_WRAPPER CLIPPY_ARGS RUSTC_WRAPPER
   export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
     CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_DEBUG=false
   CARGO_TARGET_DIR="$tmp/target" cargo install --quiet --locked "$@" \
     --root "$tmp" "$crate" --version "$version") &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    if (((SECONDS - start) % 30 < 5)) && ((SECONDS - start >= 30)); then
      log "  still building $crate: $((SECONDS - start)) s"
    fi
  done
  wait "$pid" || rc=$?
  [ "$rc" = 0 ] || { rm -rf "$tmp"; log "building $crate failed"; return "$rc"; }
  rm -rf "$tmp/target" "$dir"
  mkdir -p "$dir" && mv "$tmp/bin/"* "$dir/" && rm -rf "$tmp" && touch "$dir/.complete"
  log "built $crate in $((SECONDS - start)) s"
}

# cargo-deny reads `cargo metadata` offline (the tests never reach the network), which needs
# every locked crate in cargo's cache, those of other platforms too (windows-sys): a build
# fetches only the host's. A no-op once fetched.
build_cargo_deny() {
  cargo_tool "$CARGO_DENY_BIN" cargo-deny "$CARGO_DENY_VERSION" --no-default-features
  (cd "$LOCAL_DIR/../.." && cargo fetch --locked --quiet)
}
build_cargo_sbom() { cargo_tool "$CARGO_SBOM_BIN" cargo-sbom "$CARGO_SBOM_VERSION"; }

case "${1:-all}" in
  kubernetes) build_kubernetes ;;
  etcd) build_etcd ;;
  kwok) build_kwok ;;
  helm) build_helm ;;
  all) build_etcd; build_kwok; build_helm; build_kubernetes; build_cargo_deny ;;
  cargo-deny) build_cargo_deny ;;
  cargo-sbom) build_cargo_sbom ;;
  kubernetes-node) build_kubernetes_node ;;
  containerd) build_containerd ;;
  cni) build_cni ;;
  coredns) build_coredns ;;
  registry) build_registry ;;
  crane) build_crane ;;
  prometheus) build_prometheus ;;
  nodes) build_crane; build_registry; build_cni; build_containerd; build_coredns; build_prometheus
    build_kubernetes_node; build_cargo_sbom ;;
  *) sed -n '4,7p' "$0" >&2; exit 2 ;;
esac
