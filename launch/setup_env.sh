#!/usr/bin/env bash
# Create (or refresh) the project environment in .venv/ at the repository root and install
# dgpo_jax with its test and retrieval extras. Idempotent: with an unchanged setup.cfg a second
# run returns at once. Environment variables:
#   PYTHON   interpreter to build the venv with (default: the first of python3.12, python3.11,
#            python3 that is >= 3.11)
#   EXTRAS   pip extras to install (default: test,retrieval)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extras=${EXTRAS:-test,retrieval}
stamp=.venv/.dgpo_jax_installed
want="$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)-${extras}"
if [[ -x .venv/bin/python && -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

if [[ ! -x .venv/bin/python ]]; then
  py=${PYTHON:-}
  if [[ -z $py ]]; then
    for cand in python3.12 python3.11 python3; do
      if command -v "$cand" >/dev/null &&
         "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        py=$cand; break
      fi
    done
  fi
  [[ -n $py ]] || { echo "setup_env: need Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }
  echo "setup_env: creating .venv with $($py --version)" >&2
  "$py" -m venv .venv
fi
echo "setup_env: installing dgpo_jax[$extras] into .venv (first time: a few minutes)" >&2
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned in the extras (2.13.0) and installed in the same resolve, so pip takes the
# CPU wheel instead of pulling CUDA packages.
.venv/bin/python -m pip install -q -e ".[${extras}]"
echo "$want" > "$stamp"
