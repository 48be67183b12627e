#!/usr/bin/env bash
# One entry point for newcomers and CI:
#   ./run.sh dashboard   set up, build the demo once, then open the dashboard (http://localhost:8501)
#   ./run.sh test        set up, then run every test (add pytest options: ./run.sh test -m "not slow")
#   ./run.sh cli ARGS    set up, then python -m core ARGS
set -euo pipefail
cd "$(dirname "$0")"

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

setup() {
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "Python 3.10 or newer is needed (found: $("$PYTHON" --version 2>&1))." >&2
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
  test)
    setup
    browser
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  cli)
    setup
    exec "$VENV/bin/python" -m core "$@"
    ;;
  *)
    echo "usage: ./run.sh dashboard | test [pytest options] | cli COMMAND [options]" >&2
    exit 2
    ;;
esac
