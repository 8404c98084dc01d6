#!/usr/bin/env bash
# Create .venv and install the project into it, on a fresh Debian machine with Python 3.11, at the tested set of
# versions (constraints.txt). LATEST=1 VENV=.venv-latest installs the newest releases instead (make test-latest).
# Installs python3-venv with apt-get when the interpreter cannot make a venv (Debian splits it out), and g++ and
# Python's headers when missing (torch.compile on CPU compiles C++).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv --help >/dev/null 2>&1 || ! "$PY" -c "import ensurepip" >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv python3-pip >/dev/null
  fi
  "$PY" -m venv "$VENV"
fi
# torch.compile's CPU backend (inductor, used by train.compile and its tests) builds C++ against Python's headers.
if ! command -v g++ >/dev/null 2>&1 || \
   [ ! -f "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq g++ python3-dev >/dev/null
fi
STAMP="$VENV/.installed"
if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ] || [ constraints.txt -nt "$STAMP" ]; then
  PIN=(-c constraints.txt)
  [ "${LATEST:-0}" = 1 ] && PIN=()
  "$VENV/bin/python" -m pip install -q --upgrade "${PIN[@]}" pip setuptools
  # torch pinned even with LATEST=1: an unpinned torch would pull a multi-GB CUDA build. The project is built
  # with the venv's (pinned) setuptools, not whatever release an isolated build would fetch.
  "$VENV/bin/python" -m pip install -q "${PIN[@]}" --no-build-isolation "torch==2.13.0" -e ".[dev]"
  touch "$STAMP"
fi
