"""laplacefim: calibrated uncertainty for trained PyTorch models.

Laplace approximations built on the Fisher information / generalised Gauss-Newton matrix,
with full, diagonal and Kronecker-factored structures over all weights, the last layer or
any subset.
"""

from laplacefim.laplace import Laplace
from laplacefim.options import CurvatureKind, Likelihood, Structure
from laplacefim.precision import PosteriorPrecision

__all__ = ["CurvatureKind", "Laplace", "Likelihood", "PosteriorPrecision", "Structure"]
__version__ = "0.1.0"
