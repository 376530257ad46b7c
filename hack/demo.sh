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
say "the lab: simulated engines for the engine pods, the real vllm-router for the router pods"
start_extra() {  # name, command...: one background process of the demo, stopped by make cluster-down
  local name=$1; shift
  if [[ -f $CLUSTER_DIR/pids/extra-$name.pid ]] && kill -0 "$(cat "$CLUSTER_DIR/pids/extra-$name.pid")" 2>/dev/null; then
    old=$(cat "$CLUSTER_DIR/pids/extra-$name.pid"); kill "$old"
    for _ in $(seq 100); do kill -0 "$old" 2>/dev/null || break; sleep 0.2; done
  fi
  nohup "$@" >"$CLUSTER_DIR/$name.log" 2>&1 &
  echo $! >"$CLUSTER_DIR/pids/extra-$name.pid"
}
start_extra fleet .venv/bin/disagg-lab fleet -n serving --control-port 18090
start_extra routers .venv/bin/disagg-lab routers -n serving   # installs vllm-router from PyPI on first use
for _ in $(seq 60); do curl -sf http://127.0.0.1:18090/healthz >/dev/null && break; sleep 0.5; done
routers_up() {
  kubectl -n serving get pods -l disagg.dev/service=llama-70b,disagg.dev/role=router \
    -o jsonpath='{range .items[*]}{.status.containerStatuses[0].started}/{.status.conditions[?(@.type=="Ready")].status} {end}'
}
for _ in $(seq 180); do [[ $(routers_up) == "true/True true/True " ]] && break; sleep 1; done
echo "router pods (started by disagg-lab routers, Ready by their readiness probe): $(routers_up)"
echo

say "a streamed answer through the endpoint (the openai client -> Service -> router pod -> prefill -> decode)"
.venv/bin/disagg-lab ask -n serving llama-70b "What does disaggregated serving do?"
echo

replicas() { kubectl -n serving get deploy "llama-70b-$1" -o jsonpath='{.spec.replicas}'; }
before_prefill=$(replicas prefill); before_decode=$(replicas decode)
say "real traffic: 1 request/s of 2048-token prompts for 20 s, then 5 requests/s (the client's own step)"
.venv/bin/disagg-lab load -n serving llama-70b --rate 0s@1,20s@5 --duration 80 --prompt-tokens 2048 \
  --output-tokens 32 --out "$CLUSTER_DIR/demo-load.jsonl" >"$CLUSTER_DIR/demo-load.json" 2>"$CLUSTER_DIR/demo-load.log" &
load_pid=$!
step_at=$(( $(date +%s) + 20 ))
for _ in $(seq 100); do
  p=$(replicas prefill); d=$(replicas decode)
  if (( $(date +%s) > step_at && (p > before_prefill || d > before_decode) )); then break; fi
  sleep 1
done
echo "prefill ${before_prefill} -> $(replicas prefill), decode ${before_decode} -> $(replicas decode), $(( $(date +%s) - step_at )) s after the client's step"
echo
echo "\$ kubectl -n serving get inferenceservices"
kubectl -n serving get inferenceservices -o wide
echo
echo "Scaling decisions (Events):"
kubectl -n serving get events --field-selector involvedObject.kind=InferenceService,reason=Scaled \
  --sort-by=.lastTimestamp -o custom-columns='TIME:.lastTimestamp,MESSAGE:.message' --no-headers | tail -2 | cut -c1-240
wait $load_pid || true
echo
echo "The client's view (every request: TTFT, ITL, status, prefill and decode pods in $CLUSTER_DIR/demo-load.jsonl):"
python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(json.dumps({k: s[k] for k in ("requests","ok","errors","ttft_ms","itl_ms","kv")}))' "$CLUSTER_DIR/demo-load.json" || cat "$CLUSTER_DIR/demo-load.json"
say "load over: pools scale down after the 120 s stabilisation window"
say "done. Try: export KUBECONFIG=$KUBECONFIG; .venv/bin/disagg-lab ask -n serving llama-70b 'hello'"
say "stop everything with: make cluster-down"
