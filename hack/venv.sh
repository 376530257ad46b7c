# Sourced: creates .venv and installs the project with its test extras, once per pyproject change.
setup_say() { echo "==> [setup] $*" >&2; }
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "!!! [setup] need Python >= 3.11 (found: $("$PY" --version 2>&1))" >&2; exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
  setup_say "creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml lab/pyproject.toml | sha256sum | cut -c1-16)
if [[ ! -f $stamp ]]; then
  setup_say "installing disagg with its test dependencies, and the lab (lab/, development only), into .venv (pip)"
  .venv/bin/python -m pip install --progress-bar off -q --upgrade pip
  .venv/bin/python -m pip install --progress-bar off -e '.[test]' -e ./lab
  rm -f .venv/.installed-*; touch "$stamp"
fi
