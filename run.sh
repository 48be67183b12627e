#!/usr/bin/env bash
# One entry point for newcomers and CI:
#   ./run.sh dashboard   set up, build the demo once, then open the dashboard (http://localhost:8501, this machine only)
#   ./run.sh host DEPLOYMENT.toml [streamlit options]
#                        set up, then serve the deployment's datasets to signed-in people (README "Sign-in and roles")
#   ./run.sh test        set up, then run every test (add pytest options: ./run.sh test -m "not slow")
#   ./run.sh lint        set up, then only the static checks (ruff, ruff format, mypy, import-linter)
#   ./run.sh cli ARGS    set up, then python -m core ARGS
set -euo pipefail
CALLER_DIR="$PWD"  # `./run.sh host FILE` takes FILE relative to where it was called
cd "$(dirname "$0")"

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
# `./run.sh test` runs the static checks before pytest (XAI_LINT=0 skips them).
XAI_LINT="${XAI_LINT:-1}"

setup() {
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "Python 3.11 or newer is needed (found: $("$PYTHON" --version 2>&1))." >&2
    exit 1
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating the virtual environment in $VENV ..."
    "$PYTHON" -m venv "$VENV"
  fi
  local want have
  want="$(sha256sum requirements.txt | cut -d' ' -f1)"
  have="$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)"
  if [ "$want" != "$have" ]; then
    echo "Installing the pinned requirements (first run: a few minutes, about 5 GB with torch) ..."
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r requirements.txt
    echo "$want" > "$VENV/.requirements.sha256"
  fi
}

step() {
  # step NAME HINT COMMAND...: run one static check; on failure say which and how to fix it, and stop.
  local name="$1" hint="$2"
  shift 2
  echo "==> $name"
  if ! "$@"; then
    echo "run.sh: $name failed: $hint (XAI_LINT=0 ./run.sh test skips the static checks)." >&2
    exit 1
  fi
}

lint() {
  # The static checks, cheapest first; configured in pyproject.toml.
  step "ruff check" "fix the lines above; many fix themselves with: $VENV/bin/ruff check --fix ." \
    "$VENV/bin/ruff" check .
  step "ruff format --check" "reformat with: $VENV/bin/ruff format ." \
    "$VENV/bin/ruff" format --check .
  step "mypy" "fix the type errors above" \
    "$VENV/bin/mypy"
  step "lint-imports" "a module imports a layer above its own (ARCHITECTURE.md)" \
    "$VENV/bin/lint-imports" --no-cache
}

browser() {
  # The real-browser test drives Debian's Chromium; install it where we may (root, apt), else it is skipped.
  [ -x /usr/bin/chromium ] && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing Debian's chromium for the real-browser test ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: /usr/bin/chromium is missing and cannot be installed here; the real-browser test will be skipped." >&2
  fi
}

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
  dashboard)
    setup
    # First start: build the synthetic demo (dataset, face parser, fold classifiers); later: a no-op.
    "$VENV/bin/python" -m core demo
    exec "$VENV/bin/python" -m streamlit run dashboard/app.py "$@"
    ;;
  host)
    if [ $# -lt 1 ]; then
      echo "usage: ./run.sh host DEPLOYMENT.toml [streamlit options]" >&2
      exit 2
    fi
    deployment="$(cd "$CALLER_DIR" && realpath -- "$1")"
    shift
    setup
    # Read the file once here: a broken one stops the start with its message; its allowed hosts become
    # Streamlit's (an empty list would accept any Host header, so it is refused).
    hosts="$("$VENV/bin/python" -c '
import sys
from core.deployment import DeploymentError, read_deployment
try:
    hosts = read_deployment(sys.argv[1]).allowed_hosts
except DeploymentError as error:
    sys.exit(f"run.sh host: {error}")
if not hosts:
    sys.exit("run.sh host: set [server] allowed_hosts in the deployment file (the names people use to reach it)")
print("\n".join(hosts))
' "$deployment")"
    host_args=()
    while IFS= read -r name; do host_args+=(--server.allowedHosts "$name"); done <<< "$hosts"
    # Every interface by default (a container behind its proxy); options after the file override it.
    XAI_DEPLOYMENT="$deployment" exec "$VENV/bin/python" -m streamlit run dashboard/app.py \
      --server.address 0.0.0.0 "${host_args[@]}" --client.toolbarMode viewer "$@"
    ;;
  test)
    setup
    if [ "$XAI_LINT" = 1 ]; then lint; fi
    browser
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  lint)
    setup
    lint
    echo "All static checks passed."
    ;;
  cli)
    setup
    exec "$VENV/bin/python" -m core "$@"
    ;;
  *)
    echo "usage: ./run.sh dashboard | host DEPLOYMENT.toml [streamlit options] | test [pytest options] | lint | cli COMMAND [options]" >&2
    exit 2
    ;;
esac
