#!/usr/bin/env bash
# Builds the local cluster's binaries from their published Go modules into a cache keyed by version.
# Each component is skipped when its binaries are already there. Progress goes to stderr; a failure
# names the step that failed.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
HELM_VERSION=${HELM_VERSION:-v3.21.4}
LWS_VERSION=${LWS_VERSION:-v0.10.0}
CACHE=${DISAGG_CACHE:-$HOME/.cache/disagg}
export GOTOOLCHAIN=local CGO_ENABLED=0
export GOFLAGS=${GOFLAGS:--mod=mod}

step() { echo "==> [build] $(date -u +%H:%M:%S) $*" >&2; }
timed() {  # timed NAME FUNC: runs FUNC and reports how long it took
  local t0=$SECONDS; "$2"; step "$1: finished in $((SECONDS - t0))s"
}
fail() { echo "!!! [build] step failed: $CURRENT_STEP (see output above)" >&2; }
trap fail ERR
CURRENT_STEP=start

command -v go >/dev/null || { CURRENT_STEP="find go"; echo "go is not on PATH" >&2; exit 1; }

build_k8s() {
  local w="$CACHE/k8s/$K8S_VERSION"
  if [[ -x $w/bin/kube-apiserver && -x $w/bin/kube-controller-manager && -x $w/bin/kube-scheduler && -x $w/bin/kubectl ]]; then
    step "kubernetes $K8S_VERSION: cached in $w/bin"; return
  fi
  CURRENT_STEP="kubernetes $K8S_VERSION: resolve go.mod"
  step "$CURRENT_STEP"
  mkdir -p "$w/bin"; cd "$w"
  local staging="v0.${K8S_VERSION#v1.}" gomod
  go mod download -json "k8s.io/kubernetes@$K8S_VERSION" > dl.json
  gomod=$(python3 -c 'import json,sys; print(json.load(open("dl.json"))["GoMod"])')
  {
    echo 'module example.local/k8s-binaries'; echo; echo 'go 1.26.0'; echo
    echo 'godebug default=go1.26'; echo; echo 'replace ('
    sed -nE 's#^[[:space:]]*(k8s\.io/[A-Za-z0-9._-]+)[[:space:]]+=>[[:space:]]+\./staging/src/.*$#\t\1 => \1 '"$staging"'#p' "$gomod"
    echo ')'
  } > go.mod
  CURRENT_STEP="kubernetes $K8S_VERSION: download modules"
  step "$CURRENT_STEP ($(grep -c '=> k8s.io/' go.mod) staging replaces)"
  go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-controller-manager@$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-scheduler@$K8S_VERSION" "k8s.io/kubernetes/cmd/kubectl@$K8S_VERSION"
  local minor ldf p
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  ldf="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldf="$ldf -X '$p.gitMajor=1' -X '$p.gitMinor=$minor' -X '$p.gitVersion=$K8S_VERSION' -X '$p.gitTreeState=clean' -X '$p.buildDate=2026-01-01T00:00:00Z'"
  done
  CURRENT_STEP="kubernetes $K8S_VERSION: compile (~2200 packages; measured ~6 min cold on 2 cores)"
  step "$CURRENT_STEP"
  go build -v -trimpath -tags 'selinux,notest,grpcnotrace' -ldflags "$ldf" -o bin.tmp/ \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl 2>&1 \
    | awk '{n++; if (n % 200 == 0) { printf "    ... %d packages compiled\n", n > "/dev/stderr"; fflush() } }'
  [[ ${PIPESTATUS[0]} == 0 ]]
  mv bin.tmp/* bin/ && rmdir bin.tmp
  bin/kube-apiserver --version >&2
}

build_etcd() {
  local e="$CACHE/etcd/$ETCD_VERSION"
  if [[ -x $e/bin/etcd ]]; then step "etcd $ETCD_VERSION: cached"; return; fi
  CURRENT_STEP="etcd $ETCD_VERSION: build"; step "$CURRENT_STEP"
  mkdir -p "$e/bin"; cd "$e"
  printf 'module example.local/etcd-binaries\n\ngo 1.26.0\n' > go.mod
  go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  go build -trimpath -ldflags '-s -w' -o bin/etcd.tmp go.etcd.io/etcd/server/v3
  mv bin/etcd.tmp bin/etcd
}

build_kwok() {
  local k="$CACHE/kwok/$KWOK_VERSION"
  if [[ -x $k/bin/kwok && -d $k/stages/pod ]]; then step "kwok $KWOK_VERSION: cached"; return; fi
  CURRENT_STEP="kwok $KWOK_VERSION: build"; step "$CURRENT_STEP"
  mkdir -p "$k/bin"
  GOBIN="$k/bin.tmp" go install -trimpath -ldflags '-s -w' "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  mv "$k/bin.tmp/kwok" "$k/bin/kwok"; rmdir "$k/bin.tmp"
  # the stage definitions kwok needs ship inside the module source
  rm -rf "$k/stages"; cp -r "$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage" "$k/stages"
  chmod -R u+w "$k/stages"
}

build_helm() {
  local h="$CACHE/helm/$HELM_VERSION"
  if [[ -x $h/bin/helm ]]; then step "helm $HELM_VERSION: cached"; return; fi
  CURRENT_STEP="helm $HELM_VERSION: build"; step "$CURRENT_STEP"
  local minor; minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  GOBIN="$h/bin.tmp" go install -trimpath -ldflags "-s -w \
    -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor \
    -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mkdir -p "$h/bin"; mv "$h/bin.tmp/helm" "$h/bin/helm"; rmdir "$h/bin.tmp"
}

# The LeaderWorkerSet controller: `go install` from the module proxy first; where the proxy refuses
# sigs.k8s.io/lws, a copy of its source tree named by DISAGG_LWS_SOURCE (.ci/run sets it when the
# workplace's shared/vendor/lws-<version> is there). Its CRDs and webhook manifests are kept beside the
# binary, from the same source.
build_lws() {
  local l="$CACHE/lws/$LWS_VERSION" src=""
  if [[ -x $l/bin/lws-controller && -d $l/config/crd && -f $l/config/webhook/manifests.yaml ]]; then
    step "lws $LWS_VERSION: cached"; return
  fi
  mkdir -p "$l/bin"
  rm -rf "$l/bin.tmp" "$l/src"
  CURRENT_STEP="lws $LWS_VERSION: go install sigs.k8s.io/lws/cmd@$LWS_VERSION"
  step "$CURRENT_STEP"
  if GOBIN="$l/bin.tmp" go install -trimpath -ldflags '-s -w' "sigs.k8s.io/lws/cmd@$LWS_VERSION" 2>"$l/install.log"; then
    mv "$l/bin.tmp/cmd" "$l/bin/lws-controller.tmp"
    src="$(go env GOMODCACHE)/sigs.k8s.io/lws@$LWS_VERSION"
  else
    step "lws $LWS_VERSION: go install failed ($(tail -1 "$l/install.log")); building from \$DISAGG_LWS_SOURCE"
    CURRENT_STEP="lws $LWS_VERSION: source tree"
    if [[ -z ${DISAGG_LWS_SOURCE:-} ]]; then
      # the README's `make test` without .ci/run: the workplace's copy, where it is
      for shared in ../shared ../../shared /work/shared; do
        if [[ -f $shared/vendor/lws-$LWS_VERSION/go.mod ]]; then
          DISAGG_LWS_SOURCE=$(cd "$shared/vendor/lws-$LWS_VERSION" && pwd); break
        fi
      done
    fi
    if [[ -z ${DISAGG_LWS_SOURCE:-} ]]; then
      echo "DISAGG_LWS_SOURCE is not set: name a copy of the sigs.k8s.io/lws $LWS_VERSION source tree" \
           "(go.mod, cmd/, pkg/, api/, config/); .ci/run sets it when ../shared/vendor/lws-$LWS_VERSION exists" >&2
      false
    fi
    if ! grep -qx 'module sigs.k8s.io/lws' "$DISAGG_LWS_SOURCE/go.mod" 2>/dev/null; then
      echo "DISAGG_LWS_SOURCE=$DISAGG_LWS_SOURCE has no go.mod of module sigs.k8s.io/lws" >&2
      false
    fi
    cp -r "$DISAGG_LWS_SOURCE" "$l/src" && chmod -R u+w "$l/src"   # the source may be read-only
    CURRENT_STEP="lws $LWS_VERSION: compile from $DISAGG_LWS_SOURCE (~400 packages; measured 2 min warm, ~13 min cold on 2 cores)"
    step "$CURRENT_STEP"
    (cd "$l/src" && go build -v -trimpath -ldflags '-s -w' -o "$l/bin/lws-controller.tmp" ./cmd) 2>&1 \
      | awk '{n++; if (n % 100 == 0) { printf "    ... %d packages compiled\n", n > "/dev/stderr"; fflush() } }'
    [[ ${PIPESTATUS[0]} == 0 ]]
    src="$l/src"
  fi
  rm -rf "$l/config" && mkdir -p "$l/config"
  cp -r "$src/config/crd" "$src/config/webhook" "$l/config/" && chmod -R u+w "$l/config"
  mv "$l/bin/lws-controller.tmp" "$l/bin/lws-controller"
  rm -rf "$l/bin.tmp" "$l/src" "$l/install.log"
}

what=${1:-all}
case $what in
  etcd) timed etcd build_etcd ;; kwok) timed kwok build_kwok ;; helm) timed helm build_helm ;;
  k8s) timed kubernetes build_k8s ;; lws) timed lws build_lws ;;
  all) timed etcd build_etcd; timed kwok build_kwok; timed kubernetes build_k8s; timed helm build_helm
       timed lws build_lws ;;
  *) echo "usage: $0 [all|k8s|etcd|kwok|helm|lws]" >&2; exit 2 ;;
esac
step "done: $what"
