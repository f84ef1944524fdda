#!/usr/bin/env bash
# Create (or refresh) the benchmark virtual environment .venv-bench at the repo root.
#
# Peers: laplace-torch 0.3, curvlinops-for-pytorch 3.0.1, backpack-for-pytorch 1.7.1
# and ASDL (asdfghjkl 0.1a4, which ships the module `asdl`).
#
# Why --no-deps: laplace-torch 0.3 and backpack-for-pytorch 1.7.1 both declare
# torchvision, but neither imports it at run time (backpack only in
# backpack/utils/examples.py). PyPI's torchvision does not import beside the
# local torch 2.13.0 CPU wheel ("operator torchvision::nms does not exist"), and
# an installed-but-broken torchvision also breaks `import torchmetrics` (which
# laplace-torch imports), because torchmetrics imports torchvision whenever it
# is installed. So the peers go in with --no-deps and their real run-time
# dependencies are listed explicitly; torchvision is removed if present.
# Idempotent: re-running reinstalls only what is missing or at another version.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCH_VENV:-$REPO/.venv-bench}"
PYTHON="${PYTHON:-python3}"

TORCH_PIN="torch==2.13.0"
PEER_PINS=(
    "laplace-torch==0.3"
    "asdfghjkl==0.1a4"
    "backpack-for-pytorch==1.7.1"
    "curvlinops-for-pytorch==3.0.1"
)
# Run-time dependencies of the peers above, minus torch and torchvision.
PEER_DEPS=(
    "numpy" "scipy>=1.12" "tqdm>=4.66" "opt-einsum>=3.4.0" "torchmetrics"
    "einops>=0.3.0,<1.0.0" "unfoldNd>=0.2.0,<1.0.0" "einconv>=0.1.0" "linear_operator>=0.2.0"
    "scikit-learn"  # the benchmark's data set (load_digits)
    "transformers" "peft"  # architectures.py: BERT with LoRA adapters, built from configs
    "mnist1d" "matplotlib" "pillow"  # calibration.py: MNIST-1D's generator, plots, photos
    "aiohttp"  # serve.py's load generator (the server itself is the package's serve extra)
)

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

"${PIP[@]}" install "$TORCH_PIN"
# Constrain everything after this to the torch just installed, so nothing can
# pull another (CUDA) torch build.
CONSTRAINT="$(mktemp)"
trap 'rm -f "$CONSTRAINT"' EXIT
echo "$TORCH_PIN" > "$CONSTRAINT"
"${PIP[@]}" install -c "$CONSTRAINT" "${PEER_DEPS[@]}"
"${PIP[@]}" install -c "$CONSTRAINT" --no-deps "${PEER_PINS[@]}"
"${PIP[@]}" install -c "$CONSTRAINT" -e "$REPO[serve]"
if "$VENV/bin/python" -m pip --disable-pip-version-check show -q torchvision >/dev/null 2>&1; then
    "${PIP[@]}" uninstall -y torchvision
fi

"$VENV/bin/python" - <<'PY'
"""Import every peer and print the versions in this environment."""
import sys
from importlib.metadata import PackageNotFoundError, version

import asdl  # noqa: F401  (module shipped by the asdfghjkl==0.1a4 wheel)
import backpack  # noqa: F401
import curvlinops  # noqa: F401
import laplace  # noqa: F401
import laplace.curvature as lc
import torch

print(f"{'python':<24}{sys.version.split()[0]}")
print(f"{'torch':<24}{torch.__version__}")
for dist in ("laplace-torch", "asdfghjkl", "backpack-for-pytorch", "curvlinops-for-pytorch",
             "numpy", "scipy", "scikit-learn", "torchmetrics", "opt_einsum", "einops",
             "unfoldNd", "einconv", "linear_operator", "laplacefim"):
    try:
        print(f"{dist:<24}{version(dist)}")
    except PackageNotFoundError:
        print(f"{dist:<24}MISSING")
names = ("BackPackGGN", "BackPackEF", "AsdlGGN", "AsdlEF", "CurvlinopsGGN", "CurvlinopsEF")
print("laplace-torch backends: " + ", ".join(n for n in names if hasattr(lc, n)))
try:
    from laplacefim import Laplace  # noqa: F401
    print("laplacefim.Laplace importable")
except Exception as exc:  # noqa: BLE001
    print(f"laplacefim.Laplace NOT importable yet: {exc!r}")
PY
