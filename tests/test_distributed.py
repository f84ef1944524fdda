"""Data-parallel fits with gloo on 2 CPU processes equal a single-process fit of all data.

Each rank fits its shard; after the all-reduce both ranks must hold exactly the posterior
of one process fitting the concatenated data (float64, so up to summation order). A rank
that fails must make the other raise instead of hanging.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import STRUCTURE_CASES
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplacefim import Laplace

WORLD = 2
DTYPE = torch.float64
CASES = [
    (subset, structure, curvature)
    for subset in ("all", "last_layer")
    for structure in STRUCTURE_CASES
    for curvature in ("ggn", "empirical_fisher")
]


def _model() -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=DTYPE))
    return model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(14, 4, generator=generator, dtype=DTYPE)
    y = torch.randint(0, 3, (14,), generator=generator)
    return x, y


def _worker(rank: int, init_file: str, out_dir: str, fail_rank: int | None) -> None:
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD
        )
        torch.set_num_threads(1)
        x, y = _data()
        shard = slice(rank * 7, (rank + 1) * 7)
        xs, ys = x[shard], y[shard]
        if fail_rank == rank:
            ys = ys.clone()
            ys[0] = 99  # out of range: this rank's fit raises
        loader = DataLoader(TensorDataset(xs, ys), batch_size=3)
        results = {}
        for case in CASES if fail_rank is None else CASES[:1]:
            subset, structure, curvature = case
            la = Laplace(
                _model(), "classification", subset=subset, structure=structure, curvature=curvature
            )
            try:
                la.fit(loader)
            except Exception as error:  # reported to the test process
                results[case] = f"{type(error).__name__}: {error}"
                continue
            results[case] = (la.posterior_precision.to_dense(), la.n_data, la.log_likelihood)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()
    except Exception:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _run(fail_rank: int | None) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "init")
        mp.spawn(_worker, args=(init_file, folder, fail_rank), nprocs=WORLD, join=True)
        return [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_rank_fit_equals_single_process_fit() -> None:
    per_rank = _run(fail_rank=None)
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    for case in CASES:
        subset, structure, curvature = case
        la = Laplace(
            _model(), "classification", subset=subset, structure=structure, curvature=curvature
        )
        la.fit(loader)
        expected = la.posterior_precision.to_dense()
        for rank, results in enumerate(per_rank):
            dense, n_data, log_likelihood = results[case]
            assert n_data == 14, (case, rank)
            torch.testing.assert_close(
                dense, expected, rtol=1e-12, atol=1e-12, msg=f"{case} rank {rank}"
            )
            torch.testing.assert_close(log_likelihood, la.log_likelihood, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_failing_rank_makes_the_others_raise() -> None:
    per_rank = _run(fail_rank=1)
    case = CASES[0]
    assert "ValueError" in per_rank[1][case] and "out of range" in per_rank[1][case]
    assert "RuntimeError" in per_rank[0][case] and "other rank" in per_rank[0][case]
