#!/usr/bin/env bash
# Set up (first run only) and run the demo: exact QK-OV interference on the offline MiniLM.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh" "hf,plots"
cd "$root"
exec sketchfisher demo "$@"
