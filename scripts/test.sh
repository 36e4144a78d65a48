#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite on the CPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh" "dev,hf,plots"
cd "$root"
export SKETCHFISHER_PROGRESS=0
exec python -m pytest -q -m "not gpu" "$@"
