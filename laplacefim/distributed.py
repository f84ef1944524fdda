"""All-reduce of sum-reducible state across ``torch.distributed`` ranks.

Every statistic laplacefim accumulates — curvature blocks, loss statistics, data counts,
metric bins — is a sum, so a data-parallel fit is each rank's sum followed by one
all-reduce. Everything here is a no-op when no process group is initialised.

A rank that fails during a fit must not leave the others waiting in a collective: each
rank first all-reduces a small status vector (failed, number of data), so every rank learns
about a failure and raises. A rank that dies outright (killed, out of memory) cannot take
part; the others then wait until the process group's timeout (``timeout=`` of
``torch.distributed.init_process_group``; 30 minutes by default for gloo, 10 for NCCL) and
raise there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

Group = dist.ProcessGroup | None


def active(group: Group = None) -> bool:
    """Whether a process group is initialised (and has more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_(tensors: Sequence[Tensor], group: Group = None) -> None:
    """Sum tensors across ranks in place, with one bucketed all-reduce per dtype.

    Args:
        tensors: Tensors on the backend's device (CUDA for NCCL), summed in place.
        group: The process group; the default group if None.
    """
    if not active(group):
        return
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for members in by_dtype.values():
        bucket = torch.cat([t.reshape(-1) for t in members])
        dist.all_reduce(bucket, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for t in members:
            n = t.numel()
            t.copy_(bucket[offset : offset + n].view_as(t))
            offset += n


def exchange_status(
    failed: bool, n_data: int, device: torch.device, group: Group = None
) -> tuple[int, int]:
    """Sum ``(failed, n_data)`` over ranks: how many ranks failed, and the total data count."""
    status = torch.tensor([int(failed), n_data], dtype=torch.int64, device=device)
    if active(group):
        dist.all_reduce(status, op=dist.ReduceOp.SUM, group=group)
    n_failed, total = status.tolist()
    return int(n_failed), int(total)


def rank(group: Group = None) -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank(group) if active(group) else 0
