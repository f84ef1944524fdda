"""Data-parallel Laplace fit with torch.distributed.

Run on one machine with two CPU processes (gloo):

    torchrun --nproc_per_node=2 examples/distributed_fit.py

Each rank trains nothing (the MAP model is built identically on every rank from a seed),
fits the curvature on its shard of scikit-learn's digits through a DistributedSampler,
and the sums are all-reduced inside ``la.fit``: every rank ends with the posterior of the
whole data. Rank 0 then checks that against a single-process fit and prints both.
On GPUs use ``backend="nccl"`` and put the model on ``cuda:LOCAL_RANK`` (see
docs/distributed.md for the multi-node command line).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from laplacefim import Laplace


def make_model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).double()


def main() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    X, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(X / 16.0), torch.tensor(y))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=128, sampler=sampler)

    model = make_model()
    la = Laplace(model, "classification", subset="last_layer", structure="kron")
    la.fit(loader)  # each rank sees ~1/world of the data; the statistics are all-reduced
    tuned = la.tune_prior()
    print(
        f"rank {rank}/{world}: n_data={la.n_data}, prior={float(tuned.prior_precision):.4f}, "
        f"log evidence={float(tuned.log_marginal_likelihood):.4f}"
    )

    if rank == 0:
        # DistributedSampler pads shards to equal length, so compare with the same padded data.
        padded = [
            i for r in range(world) for i in list(DistributedSampler(data, world, r, shuffle=False))
        ]
        single = Laplace(make_model(), "classification", subset="last_layer", structure="kron")
        single.fit(DataLoader(torch.utils.data.Subset(data, padded), batch_size=128), reduce=False)
        single.tune_prior()
        gap = (
            (la.posterior_precision.diagonal() - single.posterior_precision.diagonal()).abs().max()
        )
        print(
            f"single process: n_data={single.n_data}, prior={float(single.prior_precision):.4f}; "
            f"max difference of the precision diagonals: {float(gap):.2e}"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
