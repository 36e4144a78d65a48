#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite on the CPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Triton (~1 GB) only where asked for: SKETCHFISHER_KERNEL_TESTS=1 runs the GPU kernels' code through Triton's
# interpreter on the CPU (CI does; a CPU-only machine needs no Triton otherwise)
if [ "${SKETCHFISHER_KERNEL_TESTS:-0}" = 1 ]; then
  source "$root/scripts/setup.sh" "dev,hf,plots,kernel-tests"
else
  source "$root/scripts/setup.sh" "dev,hf,plots"
fi
cd "$root"
# the report's browser test drives Debian's headless chromium (a browser download of its own fails offline)
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
      || echo "note: chromium could not be installed; the report's browser test will be skipped" >&2
  else
    echo "note: no chromium/chromedriver (apt-get install chromium chromium-driver); the browser test is skipped" >&2
  fi
fi
export SKETCHFISHER_PROGRESS=0
exec python -m pytest -q -m "not gpu" "$@"
