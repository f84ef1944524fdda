"""laplacefim: calibrated uncertainty for trained PyTorch models.

Laplace approximations built on the Fisher information / generalised Gauss-Newton matrix,
with full, diagonal, Kronecker-factored, eigenvalue-corrected Kronecker and low-rank
structures over all weights, the last layer or any subset; prior tuning by marginal
likelihood; linearised and sampling predictives. Structures, likelihoods and layer rules
are registries (``STRUCTURES``, ``LIKELIHOODS``, ``laplacefim.curvature.rules.RULES``):
see ``docs/extending.md``.
"""

from laplacefim import geometry, metrics
from laplacefim._version import __version__ as __version__
from laplacefim.distributions import BlockDiagonalNormal
from laplacefim.inputs import ModelIO
from laplacefim.laplace import Laplace
from laplacefim.likelihoods import LIKELIHOODS, Heteroscedastic
from laplacefim.marglik import PriorTuning
from laplacefim.monitor import FisherMonitor, MonitorRecord
from laplacefim.optim import NaturalGradient
from laplacefim.options import (
    CurvatureKind,
    KfacApprox,
    Link,
    PredictMethod,
    PriorStructure,
    TuneMethod,
)
from laplacefim.posterior import PosteriorPrecision
from laplacefim.prediction import Prediction
from laplacefim.structures import STRUCTURES, LowRank
from laplacefim.training import MarglikEpoch, MarglikResult, train_marglik

__all__ = [
    "LIKELIHOODS",
    "STRUCTURES",
    "BlockDiagonalNormal",
    "CurvatureKind",
    "FisherMonitor",
    "Heteroscedastic",
    "KfacApprox",
    "Laplace",
    "Link",
    "LowRank",
    "MarglikEpoch",
    "MarglikResult",
    "ModelIO",
    "MonitorRecord",
    "NaturalGradient",
    "PosteriorPrecision",
    "PredictMethod",
    "Prediction",
    "PriorStructure",
    "PriorTuning",
    "TuneMethod",
    "geometry",
    "metrics",
    "train_marglik",
]
