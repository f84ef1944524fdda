"""Option values accepted at the API boundary, validated once into enums."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


class Likelihood(str, Enum):
    """Which likelihood the model's outputs parametrise."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    BINARY = "binary"


class Structure(str, Enum):
    """How the curvature matrix is approximated."""

    FULL = "full"
    DIAG = "diag"
    KRON = "kron"


class CurvatureKind(str, Enum):
    """Which curvature matrix is accumulated."""

    GGN = "ggn"
    FISHER = "fisher"
    EMPIRICAL_FISHER = "empirical_fisher"


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
