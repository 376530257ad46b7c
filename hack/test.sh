#!/usr/bin/env bash
# The README's test command: installs what it needs, then lint, types, the unit/kmock/golden/packaging
# tests, and the e2e suite on the local cluster (its binaries built from source the first time).
#   hack/test.sh [lint] [types] [unit] [e2e]   the stages to run (default: all, in this order)
#   DISAGG_SKIP_E2E=1                          run everything but the e2e suite
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "==> [test] $*" >&2; }

stages=("$@")
[[ ${#stages[@]} == 0 ]] && stages=(lint types unit e2e)
[[ ${DISAGG_SKIP_E2E:-0} == 1 ]] && stages=("${stages[@]/e2e/}")
wants() { [[ " ${stages[*]} " == *" $1 "* ]]; }

source hack/venv.sh

if wants e2e || wants unit; then
  # first, so the chart tests find helm; the cluster itself is reused by the e2e suite
  if wants e2e; then
    if [[ ${CI:-} == true ]]; then
      # CI starts from an empty cluster: state an earlier session left in the cluster dir is not ours
      say "CI: removing any earlier local cluster"
      .venv/bin/python hack/cluster.py down
    fi
    say "local cluster (builds its binaries on first use: ~10-40 min cold on 2 cores)"
    eval "$(.venv/bin/python hack/cluster.py up | tail -1)"
  fi
  export PATH="$(.venv/bin/python hack/cluster.py bin-dir):$PATH"
fi

run_pytest() {
  local rc=0
  .venv/bin/python -m pytest "$@" || rc=$?
  if [[ $rc == 5 ]]; then
    echo "!!! [test] pytest collected no tests for: $*" >&2
    return 1
  fi
  return $rc
}

if wants lint; then
  say "ruff"
  .venv/bin/ruff check operator lab tests bench hack
  say "import direction (import-linter)"
  .venv/bin/lint-imports
fi
if wants types; then
  say "mypy --strict (product, lab, tests, bench, hack)"
  .venv/bin/mypy
fi
if wants unit; then
  say "unit, kmock, golden and packaging tests"
  run_pytest -q -p no:cacheprovider
fi
if wants e2e; then
  say "e2e tests against $KUBECONFIG"
  run_pytest tests/e2e -m e2e -q -p no:cacheprovider
elif [[ ${DISAGG_SKIP_E2E:-0} == 1 ]]; then
  say "DISAGG_SKIP_E2E=1: skipping the e2e suite"
fi
