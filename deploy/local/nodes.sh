# Real nodes for the local cluster (sourced by tidal-local): the node network, an OCI registry,
# and per node a containerd (with Debian's runc) and a kubelet; one kube-proxy; CoreDNS.
# shellcheck shell=bash
#
# Addresses (nothing in 10/8, 172.16/12, 192.168/16, never the machine's own address):
#   198.18.255.0/24  node network on the bridge tidal0 (no ports: this kernel has no dummy
#                    interfaces): .1 the API server, .11 tidal-cloud, .12 tidal-edge
#   198.18.0.0/16    pods, a /24 per node (bridge tidal-br<i>), routed by the host
#   198.19.0.0/16    Services: kubernetes 198.19.0.1, kube-dns 198.19.0.10
# Machine-specific settings (see the README): cgroup v1 with the cgroupfs driver and a cgroup
# root per node, containerd's restrict_oom_score_adj (root lacks CAP_SYS_RESOURCE here).

NODE_BRIDGE=tidal0
NODE_NET_PREFIX=198.18.255
APISERVER_ADDR=$NODE_NET_PREFIX.1
POD_CIDR=198.18.0.0/16
SERVICE_CIDR=198.19.0.0/16
DNS_SERVICE_IP=198.19.0.10
CLUSTER_DOMAIN=cluster.local
REGISTRY_PORT=${TIDAL_REGISTRY_PORT:-25000}
REGISTRY=127.0.0.1:$REGISTRY_PORT
# Prometheus for the real nodes: on the node network so the operator's pods reach it too.
PROMETHEUS_PORT=${TIDAL_PROMETHEUS_PORT:-29090}
PROMETHEUS_URL=http://$APISERVER_ADDR:$PROMETHEUS_PORT
NODES_DIR=$STATE/nodes
# name:index:tier — index i gives the address .1i, pod subnet 198.18.i.0/24, bridge tidal-br<i>,
# and the kubelet's ports.
REAL_NODES=(tidal-cloud:1:cloud tidal-edge:2:edge)
COREDNS_IMAGE=$REGISTRY/tidal-local/coredns:$COREDNS_VERSION
PAUSE_IMAGE=$REGISTRY/tidal-local/pause:$PAUSE_VERSION

node_field() { # node_field SPEC FIELD(1=name,2=index,3=tier)
  cut -d: -f"$2" <<<"$1"
}
node_addr() { echo "$NODE_NET_PREFIX.1$1"; }
node_subnet() { echo "198.18.$(($1 - 1)).0/24"; }
node_gateway() { echo "198.18.$(($1 - 1)).1"; }

# --- network ---------------------------------------------------------------------------------
net_up() {
  if ! ip link show "$NODE_BRIDGE" >/dev/null 2>&1; then
    log "creating the node network $NODE_BRIDGE ($NODE_NET_PREFIX.0/24)"
    ip link add "$NODE_BRIDGE" type bridge
  fi
  ip link set "$NODE_BRIDGE" up
  local a
  for a in "$APISERVER_ADDR" $(for n in "${REAL_NODES[@]}"; do node_addr "$(node_field "$n" 2)"; done); do
    # `replace` is idempotent; a `ip addr show | grep -q` check failed under pipefail when grep
    # quit early and ip died of SIGPIPE, so `add` ran on an assigned address.
    ip addr replace "$a/24" dev "$NODE_BRIDGE"
  done
}

net_down() {
  ip link show "$NODE_BRIDGE" >/dev/null 2>&1 && ip link del "$NODE_BRIDGE"
  return 0
}

# Host settings pods need: forwarding between pod bridges and bridged traffic through
# iptables (Services between pods on one bridge). The old values are restored by `down`.
sysctls_up() {
  local saved=$NODES_DIR/sysctl.saved k
  [ -f "$saved" ] || for k in net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables; do
    echo "$k=$(sysctl -n "$k")"
  done >"$saved"
  sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1
}

sysctls_down() {
  local saved=$NODES_DIR/sysctl.saved line
  [ -f "$saved" ] || return 0
  while read -r line; do sysctl -qw "$line" || true; done <"$saved"
  rm -f "$saved"
}

# --- registry --------------------------------------------------------------------------------
registry_up() {
  mkdir -p "$STATE/registry"
  cat >"$STATE/registry.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $STATE/registry
  delete:
    enabled: true
http:
  addr: $REGISTRY
  secret: $(cat "$PKI/tokens.csv" | sha256sum | cut -c1-32)
EOF
  start registry "$REGISTRY_BIN/registry" serve "$STATE/registry.yml"
  wait_for registry registry curl -fsS "http://$REGISTRY/v2/"
}

# --- one node --------------------------------------------------------------------------------
node_cgroups() { # node_cgroups NAME create|remove
  local c d
  for c in /sys/fs/cgroup/*/; do
    c=${c%/}
    [ "$(basename "$c")" = unified ] && continue
    [ -L "$c" ] && continue
    d=$c/$1
    if [ "$2" = create ]; then
      mkdir -p "$d"
      if [ -f "$c/cpuset.cpus" ]; then
        [ -s "$d/cpuset.cpus" ] || cat "$c/cpuset.cpus" >"$d/cpuset.cpus"
        [ -s "$d/cpuset.mems" ] || cat "$c/cpuset.mems" >"$d/cpuset.mems"
      fi
    elif [ -d "$d" ]; then
      # Children first (kubelet's QoS and pod cgroups), then the root.
      find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
    fi
  done
}

node_pki() { # node_pki NAME ADDR
  local dir=$NODES_DIR/$1/pki
  [ -f "$dir/kubelet.crt" ] && return 0
  mkdir -p "$dir"
  openssl req -newkey rsa:2048 -nodes -keyout "$dir/kubelet.key" -out "$dir/kubelet.csr" \
    -subj "/CN=system:node:$1/O=system:nodes" 2>/dev/null
  printf 'subjectAltName=IP:%s,DNS:%s\nextendedKeyUsage=serverAuth\n' "$2" "$1" >"$dir/san.ext"
  openssl x509 -req -in "$dir/kubelet.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -CAcreateserial -out "$dir/kubelet.crt" -days 3650 -extfile "$dir/san.ext" 2>/dev/null
  chmod 600 "$dir/kubelet.key"
}

node_up() { # node_up SPEC
  local name idx tier addr dir
  name=$(node_field "$1" 1) idx=$(node_field "$1" 2) tier=$(node_field "$1" 3)
  addr=$(node_addr "$idx") dir=$NODES_DIR/$name
  mkdir -p "$dir"/{containerd,kubelet,logs,cni/net.d,cni/ipam,certs.d/ghcr.io,certs.d/$REGISTRY}
  node_cgroups "$name" create
  node_pki "$name" "$addr"

  # The local registry serves its own name and, as a mirror, ghcr.io: the chart's default
  # image names resolve here as they would on an air-gapped cluster with a registry mirror.
  local h
  for h in ghcr.io "$REGISTRY"; do
    cat >"$dir/certs.d/$h/hosts.toml" <<EOF
server = "http://$REGISTRY"
[host."http://$REGISTRY"]
  capabilities = ["pull", "resolve"]
EOF
  done
  cat >"$dir/cni/net.d/10-tidal.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$name",
  "plugins": [
    {
      "type": "bridge", "bridge": "tidal-br$idx", "isGateway": true, "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$dir/cni/ipam",
        "ranges": [[{"subnet": "$(node_subnet "$idx")", "gateway": "$(node_gateway "$idx")"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  cat >"$dir/containerd.toml" <<EOF
version = 3
root = "$dir/containerd/root"
state = "$dir/containerd/state"
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/containerd/opt"
[plugins."io.containerd.nri.v1.nri"]
  disable = true
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "$addr"
  stream_server_port = "0"
[plugins."io.containerd.cri.v1.runtime"]
  # This VM's root lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$CNI_BIN"]
    conf_dir = "$dir/cni/net.d"
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        Root = "$dir/containerd/runc"
        SystemdCgroup = false
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$PAUSE_IMAGE"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "$dir/certs.d"
EOF
  # The runc shim must come from the same containerd build.
  (PATH="$CONTAINERD_BIN:$PATH" start "containerd-$name" "$CONTAINERD_BIN/containerd" \
    --config "$dir/containerd.toml")
  wait_for "containerd of $name" "containerd-$name" \
    "$CONTAINERD_BIN/ctr" --address "$dir/containerd.sock" version

  kubeconfig "$dir/kubelet.kubeconfig" "system:node:$name"
  cat >"$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $addr
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $((20247 + idx * 10))
tlsCertFile: $dir/pki/kubelet.crt
tlsPrivateKeyFile: $dir/pki/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
clusterDomain: $CLUSTER_DOMAIN
clusterDNS: [$DNS_SERVICE_IP]
resolvConf: ""
containerRuntimeEndpoint: unix://$dir/containerd.sock
podCIDR: $(node_subnet "$idx")
podLogsDir: $dir/logs
# Cgroup v1 (hybrid) cannot be switched on these machines.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$name
failSwapOn: false
enforceNodeAllocatable: [pods]
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}
imageGCHighThresholdPercent: 100
serializeImagePulls: false
maxPods: 60
registerNode: true
EOF
  kubelet_start "$1"
}

kubelet_start() { # kubelet_start SPEC (its config written by node_up)
  local name idx tier dir
  name=$(node_field "$1" 1) idx=$(node_field "$1" 2) tier=$(node_field "$1" 3)
  dir=$NODES_DIR/$name
  start "kubelet-$name" "$K8S_NODE_BIN/kubelet" --config "$dir/kubelet.yaml" \
    --kubeconfig "$dir/kubelet.kubeconfig" --root-dir "$dir/kubelet" --cert-dir "$dir/pki" \
    --hostname-override "$name" --node-ip "$(node_addr "$idx")" \
    --node-labels "tidal.rs/tier=$tier,topology.kubernetes.io/region=local-$tier" --v 1
}

# --- an edge site cut off --------------------------------------------------------------------
# What a site losing its uplink looks like from the cloud: its kubelet stops heartbeating
# (stopped; the pods keep running under containerd, as on a cut-off site) and nothing crosses
# between its pod subnet and the rest (the host, Prometheus and the other node included).
CUT_RULES=("FORWARD -s @NET@" "FORWARD -d @NET@" "OUTPUT -d @NET@" "INPUT -s @NET@")

node_spec() { # node_spec NAME: the REAL_NODES entry
  local n
  for n in "${REAL_NODES[@]}"; do [ "$(node_field "$n" 1)" = "$1" ] && { echo "$n"; return 0; }; done
  log "no real node named $1"; exit 1
}

edge_cut() { # edge_cut NAME
  local spec net r
  spec=$(node_spec "$1")
  net=$(node_subnet "$(node_field "$spec" 2)")
  stop "kubelet-$1"
  for r in "${CUT_RULES[@]}"; do
    # shellcheck disable=SC2086
    iptables -C ${r//@NET@/$net} -m comment --comment tidal-local-cut -j DROP 2>/dev/null ||
      iptables -I ${r//@NET@/$net} -m comment --comment tidal-local-cut -j DROP
  done
  log "$1 cut off: kubelet stopped, $net unreachable"
}

cut_rules_remove() { # cut_rules_remove SUBNET
  local r
  for r in "${CUT_RULES[@]}"; do
    # shellcheck disable=SC2086
    while iptables -D ${r//@NET@/$1} -m comment --comment tidal-local-cut -j DROP 2>/dev/null; do :; done
  done
}

edge_restore() { # edge_restore NAME
  local spec net
  spec=$(node_spec "$1")
  net=$(node_subnet "$(node_field "$spec" 2)")
  cut_rules_remove "$net"
  kubelet_start "$spec"
  log "$1 restored: kubelet started, $net reachable"
}

node_down() { # node_down SPEC: kubelet, the pods' processes, containerd, mounts, cgroups
  local name dir pid m
  name=$(node_field "$1" 1) dir=$NODES_DIR/$name
  stop "kubelet-$name"
  stop "containerd-$name"
  # Shims outlive containerd: stop every shim of this node (they kill their containers).
  for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $dir/containerd.sock" || true); do
    kill -9 "$pid" 2>/dev/null || true
  done
  # Whatever is left in the node's cgroups (containers whose shim is gone).
  local procs
  for _ in 1 2 3; do
    procs=$(find /sys/fs/cgroup/pids/"$name" -name cgroup.procs -exec cat {} + 2>/dev/null || true)
    [ -z "$procs" ] && break
    for pid in $procs; do kill -9 "$pid" 2>/dev/null || true; done
    sleep 0.5
  done
  # Mounts under the node's state (rootfs, shm, netns, volumes), deepest first.
  if [ -d "$dir" ]; then
    { findmnt -rn -o TARGET | grep -F "$dir/" || true; } | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done
  fi
  node_cgroups "$name" remove
  local idx
  idx=$(node_field "$1" 2)
  ip link show "tidal-br$idx" >/dev/null 2>&1 && ip link del "tidal-br$idx"
  return 0
}

# --- cluster add-ons -------------------------------------------------------------------------
kube_proxy_up() {
  cat >"$NODES_DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: tidal-cloud
# NodePorts only on the node network, never on the machine's own address.
nodePortAddresses: [$NODE_NET_PREFIX.0/24]
healthzBindAddress: 127.0.0.1:20256
metricsBindAddress: 127.0.0.1:20249
clientConnection:
  kubeconfig: $NODES_DIR/kube-proxy.kubeconfig
conntrack:
  # Leave the host's conntrack table size alone.
  maxPerCore: 0
EOF
  kubeconfig "$NODES_DIR/kube-proxy.kubeconfig" system:kube-proxy
  start kube-proxy "$K8S_NODE_BIN/kube-proxy" --config "$NODES_DIR/kube-proxy.yaml"
  wait_for kube-proxy kube-proxy curl -fsS http://127.0.0.1:20256/healthz
}

kube_proxy_down() {
  stop kube-proxy
  # Removes the KUBE-* chains it made.
  [ -x "$K8S_NODE_BIN/kube-proxy" ] && "$K8S_NODE_BIN/kube-proxy" --cleanup >/dev/null 2>&1
  # The kubelets' own chains (kube-proxy --cleanup leaves them).
  iptables -D INPUT -j KUBE-FIREWALL 2>/dev/null || true
  iptables -D OUTPUT -j KUBE-FIREWALL 2>/dev/null || true
  iptables -F KUBE-FIREWALL 2>/dev/null || true
  iptables -X KUBE-FIREWALL 2>/dev/null || true
  # KUBE-IPTABLES-HINT: the empty marker telling later tools which iptables backend was used.
  for t in filter nat mangle; do
    for c in KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT; do iptables -t "$t" -X "$c" 2>/dev/null || true; done
  done
  # The portmap plugin's chains (only present when a pod used a hostPort).
  local t c
  for t in nat filter; do
    for c in $(iptables -t "$t" -S 2>/dev/null | awk '/^-N CNI-/{print $2}'); do
      iptables -t "$t" -F "$c" 2>/dev/null || true
    done
    { iptables -t "$t" -S 2>/dev/null | grep -- '-j CNI-' || true; } | sed 's/^-A/-D/' | while read -r r; do
      # shellcheck disable=SC2086
      iptables -t "$t" $r 2>/dev/null || true
    done
    for c in $(iptables -t "$t" -S 2>/dev/null | awk '/^-N CNI-/{print $2}'); do
      iptables -t "$t" -X "$c" 2>/dev/null || true
    done
  done
  return 0
}

coredns_up() {
  sed -e "s|@IMAGE@|$COREDNS_IMAGE|g" -e "s|@DNS_IP@|$DNS_SERVICE_IP|g" \
    -e "s|@DOMAIN@|$CLUSTER_DOMAIN|g" "$LOCAL_DIR/coredns.yaml" |
    kubectl --kubeconfig "$KUBECONFIG_PATH" apply -f - >/dev/null
}

# Prometheus as the chart's scrape config says (kubernetes_sd_configs, role pod), from the host:
# api_server and a token for a user that may only list/watch pods are added to each entry.
# Scrapes every 5 s so the autoscaler sees a load step quickly; the chart's recording rules.
prometheus_up() {
  local dir=$NODES_DIR/prometheus
  mkdir -p "$dir/data"
  kubectl --kubeconfig "$KUBECONFIG_PATH" apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "tidal-local:prometheus"}
rules:
  - {apiGroups: [""], resources: [pods], verbs: [get, list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "tidal-local:prometheus"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "tidal-local:prometheus"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "tidal-local:prometheus"}]
EOF
  token_for tidal-local:prometheus >"$dir/token"
  chmod 600 "$dir/token"
  {
    printf 'global:\n  scrape_interval: 5s\n  evaluation_interval: 5s\n'
    printf 'rule_files: [%s]\n' "$LOCAL_DIR/../../charts/tidal/files/rules/tidal.rules.yaml"
    printf 'scrape_configs:\n'
    sed -e 's/^/  /' -e "s|^      - role: pod\$|&\n        api_server: $APISERVER_URL\n        authorization: {credentials_file: $dir/token}\n        tls_config: {ca_file: $PKI/ca.crt}|" \
      "$LOCAL_DIR/../../charts/tidal/files/prometheus/scrape-configs.yaml"
  } >"$dir/prometheus.yml"
  start prometheus "$PROMETHEUS_BIN/prometheus" --config.file "$dir/prometheus.yml" \
    --storage.tsdb.path "$dir/data" --storage.tsdb.retention.time 1d \
    --web.listen-address "$APISERVER_ADDR:$PROMETHEUS_PORT" --web.enable-lifecycle
  wait_for prometheus prometheus curl -fsS "$PROMETHEUS_URL/-/ready"
}

# real_nodes_schedulable true|false: uncordon or cordon the real nodes that exist.
real_nodes_schedulable() {
  local n verb=cordon
  [ "$1" = true ] && verb=uncordon
  for n in "${REAL_NODES[@]}"; do
    n=$(node_field "$n" 1)
    kubectl --kubeconfig "$KUBECONFIG_PATH" get node "$n" >/dev/null 2>&1 &&
      kubectl --kubeconfig "$KUBECONFIG_PATH" "$verb" "$n" >/dev/null
  done
  return 0
}

# --- commands --------------------------------------------------------------------------------
nodes_up() {
  for b in "$K8S_NODE_BIN/kubelet" "$CONTAINERD_BIN/containerd" "$CNI_BIN/bridge" \
    "$REGISTRY_BIN/registry" "$CRANE_BIN/crane" "$COREDNS_BIN/coredns" "$PROMETHEUS_BIN/prometheus"; do
    [ -x "$b" ] || { log "$b is not built: run '$0 setup --nodes' first"; exit 1; }
  done
  for t in runc iptables; do
    command -v "$t" >/dev/null || { log "missing $t: run '$0 setup --nodes' first"; exit 1; }
  done
  mkdir -p "$NODES_DIR"
  # One kind of node at a time: kwok's fake nodes go (`up` brings them back).
  kubectl --kubeconfig "$KUBECONFIG_PATH" delete node -l type=kwok --wait=false >/dev/null
  sysctls_up
  registry_up
  "$LOCAL_DIR/../images/build.sh" local-cluster
  local n
  for n in "${REAL_NODES[@]}"; do node_up "$n"; done
  local names
  names=$(for n in "${REAL_NODES[@]}"; do node_field "$n" 1; done)
  # shellcheck disable=SC2086
  wait_for "real nodes Ready" "kubelet-tidal-cloud" kubectl --kubeconfig "$KUBECONFIG_PATH" \
    wait --for=condition=Ready node $names --timeout=1s
  real_nodes_schedulable true
  kube_proxy_up
  coredns_up
  wait_for "CoreDNS Ready" "kubelet-tidal-cloud" kubectl --kubeconfig "$KUBECONFIG_PATH" \
    -n kube-system rollout status deploy/coredns --timeout=1s
  prometheus_up
  log "real nodes up: $(echo $names); Prometheus at $PROMETHEUS_URL"
}

nodes_down() {
  local n
  for n in "${REAL_NODES[@]}"; do cut_rules_remove "$(node_subnet "$(node_field "$n" 2)")"; done
  stop prometheus
  stop kube-proxy
  for n in "${REAL_NODES[@]}"; do node_down "$n"; done
  kube_proxy_down
  stop registry
  sysctls_down
}
