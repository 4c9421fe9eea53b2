# Shared paths for the local control plane scripts (sourced, not run).
# shellcheck shell=bash
LOCAL_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
. "$LOCAL_DIR/versions.env"
TIDAL_CACHE=${TIDAL_CACHE:-$HOME/.cache/tidal}
# State of a running control plane: logs, pids, etcd data, certs, kubeconfig.
TIDAL_LOCAL_STATE=${TIDAL_LOCAL_STATE:-$TIDAL_CACHE/local}
KUBECONFIG_PATH=$TIDAL_LOCAL_STATE/kubeconfig
GO_VERSION_KEY=$(go env GOVERSION 2>/dev/null || echo nogo)

# bin_dir NAME VERSION: where a built tool lives; the key includes the Go toolchain.
bin_dir() { echo "$TIDAL_CACHE/bin/$1-$2-$GO_VERSION_KEY"; }
K8S_BIN=$(bin_dir kubernetes "$KUBERNETES_VERSION")
ETCD_BIN=$(bin_dir etcd "$ETCD_VERSION")
KWOK_BIN=$(bin_dir kwok "$KWOK_VERSION")
HELM_BIN=$(bin_dir helm "$HELM_VERSION")
# Real nodes.
K8S_NODE_BIN=$(bin_dir kubernetes-node "$KUBERNETES_VERSION")
CONTAINERD_BIN=$(bin_dir containerd "$CONTAINERD_VERSION")
CNI_BIN=$(bin_dir cni-plugins "$CNI_PLUGINS_VERSION")
COREDNS_BIN=$(bin_dir coredns "$COREDNS_VERSION")
REGISTRY_BIN=$(bin_dir registry "$DISTRIBUTION_VERSION")
CRANE_BIN=$(bin_dir crane "$CRANE_VERSION")
PROMETHEUS_BIN=$(bin_dir prometheus "$PROMETHEUS_VERSION")
# Rust tools are keyed by the Rust toolchain instead.
RUSTC_VERSION_KEY=$(rustc --version 2>/dev/null | awk '{print $2}' || true)
CARGO_DENY_BIN=$TIDAL_CACHE/bin/cargo-deny-$CARGO_DENY_VERSION-rust${RUSTC_VERSION_KEY:-none}
CARGO_SBOM_BIN=$TIDAL_CACHE/bin/cargo-sbom-$CARGO_SBOM_VERSION-rust${RUSTC_VERSION_KEY:-none}
export PATH="$K8S_BIN:$ETCD_BIN:$KWOK_BIN:$HELM_BIN:$CARGO_DENY_BIN:$PATH"

log() { printf '[tidal-local] %s\n' "$*" >&2; }
