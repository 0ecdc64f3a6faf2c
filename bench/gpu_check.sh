#!/usr/bin/env bash
# One-shot GPU check (see bench/gpu_check.py): one JSON and a short table under $OUT (or bench/results/).
#   bench/gpu_check.sh            on a CUDA machine; ≤ 8 minutes on one H100/H200
#   bench/gpu_check.sh --cpu      smoke run on the CPU (tiny sizes; CUDA-only sections skipped)
# On a machine without the project's dependencies, wheels in .whl/ are installed to a temporary path first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
# Found, not imported: importing them would cost seconds of CPU before the check starts.
HAVE='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("deepspeed", "monai", "webdataset")))'
if ! "$PY" -c "$HAVE" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/medmae-site .whl/*.whl \
    && export PYTHONPATH=/tmp/medmae-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
exec "$PY" bench/gpu_check.py "$@"
