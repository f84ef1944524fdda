"""Closed option sets, validated once at the API boundary into enums.

The open axes — structures, likelihoods and layer rules — are registries instead
(:mod:`laplacefim.structures`, :mod:`laplacefim.likelihoods`,
:mod:`laplacefim.curvature.rules`), so that adding one touches no list here.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


def parse_option(value: object, enum: type[E], name: str) -> E:
    """Turn a user-given option into its enum member.

    Args:
        value: The value the user passed (a string or an enum member).
        enum: The enum of valid values.
        name: The argument's name, for the error message.

    Returns:
        The matching enum member.

    Raises:
        ValueError: If ``value`` is not one of the valid values; the message lists them.
    """
    if isinstance(value, enum):
        return value
    valid = [member.value for member in enum]
    if isinstance(value, str) and value in valid:
        return enum(value)
    raise ValueError(f"{name}={value!r} is not valid; expected one of {valid}.")


class CurvatureKind(str, Enum):
    """Which curvature matrix is accumulated."""

    GGN = "ggn"
    FISHER = "fisher"
    EMPIRICAL_FISHER = "empirical_fisher"


class KfacApprox(str, Enum):
    """How a Kronecker factor treats a weight shared over positions (Eschenhagen et al.,
    2023): ``expand`` sums over data and positions alike; ``reduce`` first sums the output
    gradients and averages the inputs over the positions of each datum."""

    EXPAND = "expand"
    REDUCE = "reduce"


class PriorStructure(str, Enum):
    """How many prior precisions are tuned."""

    SCALAR = "scalar"
    LAYERWISE = "layerwise"
    DIAGONAL = "diagonal"


class TuneMethod(str, Enum):
    """How the prior precision is tuned."""

    MARGLIK = "marglik"
    GRIDSEARCH = "gridsearch"


class PredictMethod(str, Enum):
    """How predictions integrate over the posterior."""

    GLM = "glm"
    NN = "nn"


class Link(str, Enum):
    """How the GLM's Gaussian over logits becomes class probabilities."""

    PROBIT = "probit"
    MC = "mc"
    BRIDGE = "bridge"
