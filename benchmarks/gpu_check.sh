#!/usr/bin/env bash
# GPU check in one command, under 10 minutes on one GPU, everything written to one file:
# the CUDA variants of the tests, a host-sync check of the fit and predict loops, and the
# fit / tune / predict timings of laplacefim on CUDA, then a summary line per section.
#
# Usage (repository root, on a machine with CUDA and a python3 that has torch):
#   bash benchmarks/gpu_check.sh [RESULTS_FILE]
# The results go to RESULTS_FILE, else to $OUT/gpu_check.txt where $OUT is set (the device
# tool's output folder), else to gpu_check_results.txt. The package runs from the checkout
# (PYTHONPATH), nothing is installed into that python; pure-Python dependencies it lacks
# (pyro-ppl, pyro-api) are taken from wheels in .whl/ when that folder exists.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:+$OUT/gpu_check.txt}}
RESULTS=${RESULTS:-gpu_check_results.txt}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee "$RESULTS") 2>&1

if ! "$PY" -c "import pyro" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi

echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

summary=()
status=0
section() {  # section NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    local verdict=passed
    [ $rc -eq 124 ] && verdict="timed out"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="failed (exit $rc)"
    [ $rc -ne 0 ] && status=1
    summary+=("$(printf '%-28s %-18s %4ds' "$name" "$verdict" $((SECONDS - start)))")
}

section "import" 60 "$PY" -c "import laplacefim; print('laplacefim', laplacefim.__version__)"
section "CUDA tests" 240 "$PY" -m pytest -q -p no:cacheprovider -p no:warnings -k cuda -rs tests
section "host-sync check" 60 "$PY" benchmarks/sync_check.py
section "CUDA timings (ours)" 180 "$PY" benchmarks/cuda_timing.py

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
echo "overall: $([ $status -eq 0 ] && echo passed || echo FAILED); results in $RESULTS"
exit $status
