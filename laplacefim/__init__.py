"""laplacefim: calibrated uncertainty for trained PyTorch models.

Laplace approximations built on the Fisher information / generalised Gauss-Newton matrix,
with full, diagonal and Kronecker-factored structures over all weights, the last layer or
any subset; prior tuning by marginal likelihood; linearised and sampling predictives.
"""

from laplacefim import geometry, metrics
from laplacefim.distributions import BlockDiagonalNormal
from laplacefim.laplace import Laplace
from laplacefim.marglik import PriorTuning
from laplacefim.monitor import FisherMonitor, MonitorRecord
from laplacefim.optim import NaturalGradient
from laplacefim.options import (
    CurvatureKind,
    Likelihood,
    Link,
    PredictMethod,
    PriorStructure,
    Structure,
    TuneMethod,
)
from laplacefim.precision import PosteriorPrecision
from laplacefim.predictive import Prediction

__all__ = [
    "BlockDiagonalNormal",
    "CurvatureKind",
    "FisherMonitor",
    "Laplace",
    "Likelihood",
    "Link",
    "MonitorRecord",
    "NaturalGradient",
    "PosteriorPrecision",
    "PredictMethod",
    "Prediction",
    "PriorStructure",
    "PriorTuning",
    "Structure",
    "TuneMethod",
    "geometry",
    "metrics",
]
__version__ = "0.1.0"
