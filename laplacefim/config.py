"""The values under the front door: configuration, hyperparameters and a fitted state.

``Laplace`` is a façade over these: the fit produces a :class:`FitState`; tuning,
persistence and fine-tuning are functions of these values. The same
:class:`CurvatureConfig` drives :class:`~laplacefim.optim.NaturalGradient`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from laplacefim.inputs import ModelIO
from laplacefim.layout import Layout
from laplacefim.likelihoods import LikelihoodModel
from laplacefim.options import CurvatureKind, KfacApprox
from laplacefim.structures import BlockDiagonal, StructureSpec
from laplacefim.subsets import Selection, SubsetSpec

# A dense (P, P) curvature is refused above this many parameters (20,000² float32 ≈ 1.6 GB).
MAX_FULL_PARAMS = 20_000


@dataclass(frozen=True)
class CurvatureConfig:
    """What a curvature fit needs besides the model and the data; validated on creation by
    its builders (``Laplace``, ``NaturalGradient``).

    Attributes:
        likelihood: What the outputs parametrise.
        structure: How the curvature is approximated.
        kind: Exact GGN, MC Fisher or empirical Fisher.
        subset: Which parameters.
        fisher_samples: Labels drawn per datum for the MC Fisher.
        accumulate_dtype: Dtype of the statistics (None: the parameters').
        kfac_approx: Kronecker flavour for weights shared over positions.
        max_full_params: Largest ``P`` of a dense block.
        io: How batches are split and the model is called.
        pass_cache_mb: Structures that pass over the data more than once keep the first
            pass's per-layer inputs and output gradients, up to this many megabytes, and
            replay them instead of running the model again (0 turns it off).
    """

    likelihood: LikelihoodModel
    structure: StructureSpec
    kind: CurvatureKind
    subset: SubsetSpec = "all"
    fisher_samples: int = 1
    accumulate_dtype: torch.dtype | None = None
    kfac_approx: KfacApprox = KfacApprox.EXPAND
    max_full_params: int = MAX_FULL_PARAMS
    io: ModelIO = field(default_factory=ModelIO)
    pass_cache_mb: float = 256.0


@dataclass(frozen=True)
class Hyperparameters:
    """The posterior's hyperparameters.

    Attributes:
        prior_precision: 0-d, one per layer ``(L,)`` or one per parameter ``(P,)``.
        sigma_noise: The likelihood's observation noise, 0-d or one per output.
        temperature: The curvature is divided by it.
    """

    prior_precision: Tensor
    sigma_noise: Tensor
    temperature: float


@dataclass(frozen=True)
class FitState:
    """Everything a successful fit produced; swapped in whole, so a failed fit changes nothing.

    Attributes:
        selection: The chosen parameters.
        last_layer: The module found as the last layer, if ``subset="last_layer"``.
        curvature: The fitted blocks (summed over data and ranks).
        mean: The chosen parameters at the fit, flat ``(P,)``.
        loss_stats: The likelihood's summed loss statistic.
        n_data: Number of data.
        sigma_fit: The noise the curvature was formed at.
        layout: Blocks and layers along the flat vector.
        input_shape: Shape of one input (tensor inputs), checked at prediction.
    """

    selection: Selection
    last_layer: str | None
    curvature: BlockDiagonal
    mean: Tensor
    loss_stats: Tensor
    n_data: int
    sigma_fit: Tensor
    layout: Layout
    input_shape: tuple[int, ...] | None
