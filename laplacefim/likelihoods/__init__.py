"""Likelihoods, by name: what the model's outputs parametrise.

Each likelihood is one class implementing :class:`~laplacefim.likelihoods.base.LikelihoodModel`
and one line in :data:`LIKELIHOODS`. ``Laplace(likelihood=...)`` takes a registered name
or an instance (for a likelihood with options, e.g.
``Heteroscedastic(parametrisation="softplus")``).
"""

from __future__ import annotations

from typing import Any

from laplacefim.likelihoods.base import LikelihoodModel, Targets
from laplacefim.likelihoods.binary import Binary
from laplacefim.likelihoods.classification import Classification
from laplacefim.likelihoods.heteroscedastic import Heteroscedastic
from laplacefim.likelihoods.regression import Regression
from laplacefim.registry import Registry

LIKELIHOODS: Registry[Any] = Registry("likelihood")
LIKELIHOODS.register("classification", Classification)
LIKELIHOODS.register("regression", Regression)
LIKELIHOODS.register("binary", Binary)
LIKELIHOODS.register("heteroscedastic", Heteroscedastic)


def make_likelihood(spec: object, options: dict[str, Any] | None = None) -> LikelihoodModel:
    """A likelihood from a registered name (with ``options``) or an instance.

    Raises:
        ValueError: For an unknown name; the message lists the registered ones.
        TypeError: For an object that is neither a name nor an instance of a registered
            likelihood class.
    """
    if isinstance(spec, str):
        return LIKELIHOODS.get(spec)(**(options or {}))
    if isinstance(spec, tuple(LIKELIHOODS.entries())):
        return spec  # type: ignore[return-value]
    raise TypeError(
        f"likelihood must be one of {LIKELIHOODS.names} or an instance of a registered "
        f"likelihood class, got {type(spec).__name__}."
    )


__all__ = [
    "LIKELIHOODS",
    "Binary",
    "Classification",
    "Heteroscedastic",
    "LikelihoodModel",
    "Regression",
    "Targets",
    "make_likelihood",
]
