#!/usr/bin/env bash
# GPU check, under 5 minutes on one GPU: the CUDA variants of the tests, a host-sync
# check of the fit/predict loops, and the fit benchmark's fit-to-epoch ratios (ours only).
# Usage (repository root, on a machine with CUDA):  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [ ! -x .venv-gpu/bin/python ]; then
    "$PY" -m venv .venv-gpu
    .venv-gpu/bin/pip install --quiet torch numpy pyro-ppl scikit-learn tqdm pytest hypothesis matplotlib
    .venv-gpu/bin/pip install --quiet --no-deps -e .
fi
.venv-gpu/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
status=0
echo "== CUDA tests"
timeout 150 .venv-gpu/bin/python -m pytest -q -p no:warnings -k cuda tests/test_curvature_contract.py tests/test_metrics.py || status=1
echo "== host-sync check"
timeout 60 .venv-gpu/bin/python benchmarks/sync_check.py || status=1
echo "== fit / tune / predict timing on CUDA (ours)"
timeout 90 .venv-gpu/bin/python benchmarks/cuda_timing.py || status=1
exit $status
