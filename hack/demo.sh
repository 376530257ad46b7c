#!/usr/bin/env bash
# The README's first command: a fresh machine to a running disaggregated InferenceService on the
# local cluster. Builds the cluster's binaries the first time (20-40 min on 2 cores, cached after).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "==> [demo] $*" >&2; }

source hack/venv.sh

say "local cluster"
eval "$(.venv/bin/python hack/cluster.py up | tail -1)"
CLUSTER_DIR=$(dirname "$KUBECONFIG")
export PATH="$(.venv/bin/python hack/cluster.py bin-dir):$PATH"

say "CRD (generated from the models)"
.venv/bin/disagg crd | kubectl apply --server-side -f - >/dev/null
kubectl wait --for=condition=Established crd/inferenceservices.disagg.dev --timeout=60s >/dev/null

say "operator RBAC and a ServiceAccount token (the operator runs with exactly the shipped permissions)"
kubectl create namespace disagg-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null
.venv/bin/disagg rbac --namespace disagg-system | kubectl apply --server-side -f - >/dev/null
.venv/bin/python hack/cluster.py sa-kubeconfig --namespace disagg-system --service-account disagg-operator \
  --out "$CLUSTER_DIR/operator.kubeconfig" >/dev/null

say "operator: disagg run --all-namespaces (log: $CLUSTER_DIR/operator.log)"
if [[ -f $CLUSTER_DIR/pids/extra-operator.pid ]] && kill -0 "$(cat "$CLUSTER_DIR/pids/extra-operator.pid")" 2>/dev/null; then
  old=$(cat "$CLUSTER_DIR/pids/extra-operator.pid"); kill "$old"
  for _ in $(seq 50); do kill -0 "$old" 2>/dev/null || break; sleep 0.2; done
fi
KUBECONFIG="$CLUSTER_DIR/operator.kubeconfig" nohup .venv/bin/disagg run --all-namespaces \
  --listen-host 127.0.0.1 --liveness-port 18080 --metrics-port 19100 \
  --prometheus-url http://127.0.0.1:9090 --autoscale-tick 5 --scale-down-window 120 \
  --scrape-interval 2 --prometheus-rate-window 32s \
  >"$CLUSTER_DIR/operator.log" 2>&1 &
echo $! >"$CLUSTER_DIR/pids/extra-operator.pid"
for _ in $(seq 60); do curl -sf http://127.0.0.1:18080/healthz >/dev/null && break; sleep 0.5; done
curl -sf http://127.0.0.1:18080/healthz >/dev/null || { tail -30 "$CLUSTER_DIR/operator.log"; exit 1; }

say "apply examples/01-vllm-nixl-llama70b.yaml (prefill on nvidia-h100, decode on nvidia-h200)"
kubectl create namespace serving --dry-run=client -o yaml | kubectl apply -f - >/dev/null
# from its initial state on every run: an earlier run's autoscaled counts would blur the burst below
kubectl -n serving delete inferenceservice llama-70b --ignore-not-found --wait=true >/dev/null
kubectl -n serving wait --for=delete deploy -l disagg.dev/service=llama-70b --timeout=60s >/dev/null 2>&1 || true
kubectl apply -f examples/01-vllm-nixl-llama70b.yaml
say "waiting for Ready"
kubectl -n serving wait --for=condition=Ready inferenceservice/llama-70b --timeout=180s

echo
echo "\$ kubectl -n serving get inferenceservices"
kubectl -n serving get inferenceservices -o wide
echo
echo "\$ kubectl -n serving get deploy,svc,pdb,networkpolicy"
kubectl -n serving get deploy,svc,pdb,networkpolicy
echo
echo "Pods and the accelerator of the node each landed on:"
kubectl -n serving get pods -o custom-columns='POD:.metadata.name,ROLE:.metadata.labels.disagg\.dev/role,STATUS:.status.phase,NODE:.spec.nodeName,IP:.status.podIP' --no-headers \
  | while read -r pod role phase node ip; do
      product=$(kubectl get node "$node" -o jsonpath='{.metadata.labels.nvidia\.com/gpu\.product}{.metadata.labels.amd\.com/gpu\.product-name}')
      printf '%-38s %-8s %-8s %-22s %-16s %s\n' "$pod" "$role" "$phase" "$node" "$ip" "${product:-cpu-only}"
    done
echo
say "simulated engines for the Ready pods (real metric names, scraped by the local Prometheus)"
if [[ -f $CLUSTER_DIR/pids/extra-fleet.pid ]] && kill -0 "$(cat "$CLUSTER_DIR/pids/extra-fleet.pid")" 2>/dev/null; then
  old=$(cat "$CLUSTER_DIR/pids/extra-fleet.pid"); kill "$old"
  for _ in $(seq 50); do kill -0 "$old" 2>/dev/null || break; sleep 0.2; done
fi
nohup .venv/bin/disagg-lab fleet -n serving --control-port 18090 --default-load 1x \
  >"$CLUSTER_DIR/fleet.log" 2>&1 &
echo $! >"$CLUSTER_DIR/pids/extra-fleet.pid"
for _ in $(seq 60); do curl -sf http://127.0.0.1:18090/healthz >/dev/null && break; sleep 0.5; done

replicas() { kubectl -n serving get deploy "llama-70b-$1" -o jsonpath='{.spec.replicas}'; }
before_prefill=$(replicas prefill); before_decode=$(replicas decode)
say "steady load: let the autoscaler see it (20 s)"
sleep 20
kubectl -n serving get inferenceservice llama-70b
say "a load burst: 8x the steady load"
curl -sf -X PUT http://127.0.0.1:18090/load/serving/llama-70b -d '{"x": 8}' >/dev/null
burst_at=$(date +%s)
for _ in $(seq 120); do
  p=$(replicas prefill); d=$(replicas decode)
  if (( p > before_prefill && d > before_decode )); then break; fi
  sleep 1
done
echo "prefill ${before_prefill} -> $(replicas prefill), decode ${before_decode} -> $(replicas decode), $(( $(date +%s) - burst_at )) s after the burst"
echo
echo "\$ kubectl -n serving get inferenceservices"
kubectl -n serving get inferenceservices -o wide
echo
echo "Scaling decisions (Events):"
kubectl -n serving get events --field-selector involvedObject.kind=InferenceService,reason=Scaled \
  --sort-by=.lastTimestamp -o custom-columns='TIME:.lastTimestamp,MESSAGE:.message' --no-headers | tail -2 | cut -c1-240
echo
curl -sf -X PUT http://127.0.0.1:18090/load/serving/llama-70b -d '{"x": 1}' >/dev/null
say "load back to 1x: pools scale down after the 120 s stabilisation window"
say "done. Try: export KUBECONFIG=$KUBECONFIG; kubectl -n serving describe inferenceservice llama-70b"
say "stop everything with: make cluster-down"
