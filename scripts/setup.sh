#!/usr/bin/env bash
# Creates .venv (if needed) and installs sketchfisher with the given extras. Sourced by demo.sh/test.sh.
# torch is installed first at a pinned CPU version so that pip does not pull a multi-GB CUDA build;
# an existing torch (e.g. a GPU build you installed yourself) is kept.
set -euo pipefail
extras="${1:-hf,plots}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SKETCHFISHER_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.sketchfisher-$extras-$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$py" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  "$py" -c "import torch" 2>/dev/null || "$py" -m pip install --quiet "torch==2.13.0"
  "$py" -m pip install --quiet -e "$root[$extras]"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
