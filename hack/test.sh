#!/usr/bin/env bash
# The README's test command: installs what it needs, then lint, types, unit/golden/kmock tests, and
# the e2e suite on the local cluster (built from source the first time: 20-40 min on 2 cores).
#   DISAGG_SKIP_E2E=1  run everything but the e2e suite
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "==> [test] $*" >&2; }

source hack/venv.sh

if [[ ${DISAGG_SKIP_E2E:-0} != 1 ]]; then
  # first, so the chart tests below find helm; the cluster itself is reused by the e2e suite
  if [[ ${CI:-} == true ]]; then
    # CI starts from an empty cluster: state an earlier session left in the cluster dir is not ours
    say "CI: removing any earlier local cluster"
    .venv/bin/python hack/cluster.py down
  fi
  say "local cluster (builds its binaries on first use: ~10-40 min cold on 2 cores)"
  eval "$(.venv/bin/python hack/cluster.py up | tail -1)"
  export PATH="$(.venv/bin/python hack/cluster.py bin-dir):$PATH"
fi

say "ruff"
.venv/bin/ruff check operator lab tests bench hack
say "mypy --strict"
.venv/bin/mypy
say "import direction (import-linter)"
.venv/bin/lint-imports

run_pytest() {
  local rc=0
  .venv/bin/python -m pytest "$@" || rc=$?
  if [[ $rc == 5 ]]; then
    echo "!!! [test] pytest collected no tests for: $*" >&2
    return 1
  fi
  return $rc
}

say "unit, golden and kmock tests"
run_pytest tests/unit -q -p no:cacheprovider

if [[ ${DISAGG_SKIP_E2E:-0} == 1 ]]; then
  say "DISAGG_SKIP_E2E=1: skipping the e2e suite"
  exit 0
fi
say "e2e tests against $KUBECONFIG"
run_pytest tests/e2e -m e2e -q -p no:cacheprovider
