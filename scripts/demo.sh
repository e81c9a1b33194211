#!/usr/bin/env bash
# Set up (once) and run the local reproduction: a stall diagnosed live, then fixed by ws_encode_policy=strip.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$("$root/scripts/venv.sh")
exec "$venv/bin/python" "$root/scripts/reproduce.py" "$@"
