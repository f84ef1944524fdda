"""Binning for calibration metrics: equal-width and equal-mass (adaptive) bins, their
per-bin sums, the calibration error of binned sums, and reliability diagrams.

Bin ``j`` of ``n`` equal-width bins is ``(j/n, (j+1)/n]`` (the first is closed); equal-mass
bins are formed exactly from the samples, or, for streaming accumulators, from a fine
histogram of ``N_SUB_BINS`` sub-bins (exact up to one sub-bin per bin edge).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from laplacefim.metrics._base import Norm

# Sub-bins of the fine histogram from which streaming accumulators form adaptive
# (equal-mass) bins; the grouping is exact up to one sub-bin (width 1/2048) per bin edge.
N_SUB_BINS = 2048


def bin_edges(n: int, device: torch.device) -> Tensor:
    """Equal-width edges ``j / n`` (each correctly rounded to float64), ``(n + 1,)``."""
    return torch.arange(n + 1, dtype=torch.float64, device=device) / n


def scatter_bins(group: Tensor, n: int, values: list[Tensor]) -> list[Tensor]:
    """Sum each ``(K, M)`` value into ``n`` bins per row by ``group`` ``(K, M)``."""
    return [v.new_zeros(v.shape[0], n).scatter_add_(1, group, v) for v in values]


def bin_sums(conf: Tensor, hit: Tensor, n: int) -> list[Tensor]:
    """Per-bin sums of confidences, hits and counts ``(K, n)`` over equal-width bins."""
    conf = conf.contiguous()
    group = torch.bucketize(conf, bin_edges(n, conf.device)[1:-1])  # (lo, hi], first [0, hi]
    return scatter_bins(group, n, [conf, hit, torch.ones_like(conf)])


def upper_edges(group: Tensor, top: Tensor, n: int) -> Tensor:
    """Bin edges ``(K, n + 1)``: 0, the running max of each bin's ``top`` values, then 1."""
    upper = top.new_zeros(top.shape[0], n).scatter_reduce_(1, group, top, "amax")
    upper = upper.cummax(dim=1).values
    ends = top.new_zeros(top.shape[0], 1)
    return torch.cat([ends, upper[:, :-1], ends + 1], dim=1)


def group_sub_bins(fine: list[Tensor], n: int) -> tuple[list[Tensor], Tensor]:
    """Equal-mass bins from a fine histogram; a sub-bin joins the bin holding its mid-mass.

    Sub-bin ``k`` (count ``c_k``, cumulative count ``m_k``) goes to bin
    ``⌊(m_k − c_k / 2) · n / N⌋``, which is where ``_exact_adaptive`` puts a single sample.
    """
    count = fine[2]
    total = count.sum(1, keepdim=True).clamp_min(1)
    mid2 = 2 * count.cumsum(1) - count  # twice the mid-mass: integers, exact in float64
    group = torch.div(mid2 * n, 2 * total, rounding_mode="floor").clamp(0, n - 1).long()
    fine_upper = bin_edges(count.shape[1], count.device)[1:].expand_as(count)
    top = torch.where(count > 0, fine_upper, torch.zeros_like(count))
    return scatter_bins(group, n, fine), upper_edges(group, top, n)


def exact_adaptive(conf: Tensor, hit: Tensor, n: int) -> tuple[list[Tensor], Tensor]:
    """Equal-mass bins from all samples: the sample of rank ``r`` (1-based, ascending by
    confidence, ties by hit so the result is order-free) goes to bin ``⌊(r − ½) · n / B⌋``."""
    by_hit = hit.sort(dim=1, stable=True).indices
    conf, hit = conf.gather(1, by_hit), hit.gather(1, by_hit)
    by_conf = conf.sort(dim=1, stable=True).indices
    conf, hit = conf.gather(1, by_conf), hit.gather(1, by_conf)
    size = conf.shape[1]
    rank = torch.arange(1, size + 1, device=conf.device)
    group = torch.div((2 * rank - 1) * n, 2 * max(size, 1), rounding_mode="floor")
    group = group.expand_as(conf).contiguous()
    return scatter_bins(group, n, [conf, hit, torch.ones_like(conf)]), upper_edges(group, conf, n)


def binned_error(binned: list[Tensor], norm: Norm) -> float:
    """Calibration error from per-bin sums ``(K, n)``, averaged over the ``K`` rows."""
    conf_sum, hit_sum, count = binned
    total = count.sum(1)
    if bool((total == 0).any()):
        raise ValueError("calibration error: no samples have been seen.")
    gap = (hit_sum - conf_sum).abs() / count.clamp_min(1)  # 0 in empty bins
    if norm is Norm.L1:
        per_row = (count * gap).sum(1) / total
    elif norm is Norm.L2:
        per_row = ((count * gap.square()).sum(1) / total).sqrt()
    else:
        per_row = gap.amax(1)
    return float(per_row.mean())


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Per-bin statistics of a reliability diagram.

    Attributes:
        edges: Bin edges ``(n_bins + 1,)``; bin ``j`` is ``(edges[j], edges[j + 1]]``. For
            adaptive bins, ``edges[j + 1]`` is the largest confidence in bin ``j`` (one-shot)
            or the upper edge of its last non-empty sub-bin (streaming); empty bins repeat
            the previous edge.
        confidence: Mean confidence per bin ``(n_bins,)``; NaN for empty bins.
        accuracy: Fraction of hits per bin ``(n_bins,)``; NaN for empty bins.
        count: Number of samples per bin ``(n_bins,)``.
    """

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    count: Tensor


def to_diagram(binned: list[Tensor], edges: Tensor) -> ReliabilityDiagram:
    conf_sum, hit_sum, count = (t[0] for t in binned)
    if count.sum() == 0:
        raise ValueError("reliability: no samples have been seen.")
    nan = torch.full_like(count, float("nan"))
    return ReliabilityDiagram(
        edges=edges[0].clone(),
        confidence=torch.where(count > 0, conf_sum / count.clamp_min(1), nan),
        accuracy=torch.where(count > 0, hit_sum / count.clamp_min(1), nan),
        count=count.clone(),
    )
