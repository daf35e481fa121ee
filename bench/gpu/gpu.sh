#!/usr/bin/env bash
# GPU check + benchmark of the sketch kernels; writes bench/results/gpu-latest.md (or --out FILE).
# On a machine without the package's dependencies, carry their wheels in .whl/ (ignored by git):
# they are installed to /tmp/sdi-site first. `--smoke` checks the script on a CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sdi-site .whl/*.whl
  export PYTHONPATH="/tmp/sdi-site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" bench/gpu/gpu.py "$@"
