"""Check that the fit and predict loops make no host synchronisation on CUDA.

Runs one batch of every (structure, curvature) fit and one GLM prediction chunk under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising call.
Only the per-batch work is checked: the single check of the collected flags after the
loop, and the decomposition, synchronise on purpose. Exits 0 when nothing synchronised.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from laplacefim import Laplace
from laplacefim.predictive import chunk_moments


def main() -> int:
    if not torch.cuda.is_available():
        print("sync_check: no CUDA device; nothing checked")
        return 0
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(256, 64, device=device)
    y = torch.randint(0, 10, (256,), device=device)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    failures = []
    for subset in ("all", "last_layer"):
        for structure in ("diag", "kron", "full"):
            for curvature in ("ggn", "fisher", "empirical_fisher"):
                if subset == "all" and structure == "full":
                    continue
                la = Laplace(
                    model, "classification", subset=subset, structure=structure, curvature=curvature
                )
                la.fit([(x, y)], generator=generator)  # warm-up: finds the last layer, decomposes
                engine = la._engine(la._fitted())
                engine.batch(x, y, generator)  # first batch decides the fast path
                blocks, precisions = la.curvature.blocks, la._precisions()
                torch.cuda.synchronize()
                name = f"{subset}/{structure}/{curvature}"
                try:
                    torch.cuda.set_sync_debug_mode("error")
                    engine.batch(x, y, generator)
                    chunk_moments(engine, blocks, precisions, x)  # covariances
                    chunk_moments(engine, blocks, precisions, x, diagonal=True)  # variances
                except RuntimeError as error:
                    failures.append(f"{name}: {error}")
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                print(
                    f"{name:40s} {'SYNC' if failures and failures[-1].startswith(name) else 'ok'}"
                )
    print(f"sync_check: {len(failures)} configuration(s) synchronised")
    for failure in failures:
        print("  ", failure.splitlines()[0])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
