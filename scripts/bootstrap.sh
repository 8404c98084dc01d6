#!/usr/bin/env bash
# Create .venv and install the project into it, on a fresh Debian machine with Python 3.11.
# Installs python3-venv with apt-get when the interpreter cannot make a venv (Debian splits it out), and g++ and
# Python's headers when missing (torch.compile on CPU compiles C++).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv --help >/dev/null 2>&1 || ! "$PY" -c "import ensurepip" >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv python3-pip >/dev/null
  fi
  "$PY" -m venv .venv
fi
# torch.compile's CPU backend (inductor, used by train.compile and its tests) builds C++ against Python's headers.
if ! command -v g++ >/dev/null 2>&1 || \
   [ ! -f "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq g++ python3-dev >/dev/null
fi
STAMP=.venv/.installed
if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q "torch==2.13.0" -e ".[dev]"
  touch "$STAMP"
fi
