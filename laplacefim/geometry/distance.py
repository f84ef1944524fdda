"""The Fisher metric as a distance, against the exact KL divergence of the predictions.

For a small step ``δ``, ``KL(p(y|x,θ) ‖ p(y|x,θ+δ)) = ½ δᵀ F(θ) δ + O(‖δ‖³)`` summed over
the data, with ``F`` the Fisher information (= GGN for these likelihoods): the Fisher is
the metric tensor of the predictive distribution.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn
from torch.func import jvp

from laplacefim.geometry.operator import CurvatureOperator
from laplacefim.inputs import ModelIO
from laplacefim.likelihoods import LikelihoodModel
from laplacefim.subsets import SubsetSpec


def kl_outputs(op: CurvatureOperator, f1: Tensor, f2: Tensor) -> Tensor:
    """Per-datum ``KL(p(y|f₁) ‖ p(y|f₂))`` for outputs ``(B, C)``; returns ``(B,)``."""
    return op.likelihood.kl(f1, f2, op.noise)


def fisher_quadratic(op: CurvatureOperator, theta: Tensor | None, delta: Tensor) -> Tensor:
    """``δᵀ G(θ) δ = Σₙ (Jₙδ)ᵀ Λₙ (Jₙδ)``: one Jacobian-vector product per batch, 0-d."""
    tangent = {n: t[0] for n, t in op.unflatten(op.check_vector(delta, "delta")[None]).items()}

    def work(params: dict[str, Tensor], x: Any, f: Any, y: Tensor) -> Tensor:
        jd = jvp(op.outputs_fn(x), (params,), (tangent,))[1]
        return (jd[None] * op.apply_lambda(f, jd[None])).sum()

    return op.map_batches(work, theta)


def fisher_distance(
    model: nn.Module,
    loader: Iterable[Any],
    likelihood: str | LikelihoodModel,
    theta1: Tensor,
    theta2: Tensor,
    *,
    sigma_noise: float | Tensor = 1.0,
    subset: SubsetSpec = "all",
    io: ModelIO | None = None,
) -> Tensor:
    """The squared Fisher distance ``(θ₁ − θ₂)ᵀ F(θ₁) (θ₁ − θ₂)``, summed over the data.

    ``F(θ₁)`` is the GGN (= Fisher) at ``θ₁``, applied matrix-free (one Jacobian-vector
    product per batch). Half of it approximates :func:`predictive_kl` for close settings.

    Args:
        model: The model (its architecture; the parameters are replaced by ``θ₁``).
        loader: ``(inputs, targets)`` batches.
        likelihood: A registered likelihood name or instance.
        theta1: Flat parameters ``(P,)`` in ``named_parameters()`` order.
        theta2: Flat parameters ``(P,)``.
        sigma_noise: Regression noise.
        subset: Which parameters the vectors cover.
        io: How batches are split and the model is called (mapping batches), as for
            :class:`~laplacefim.Laplace`.

    Returns:
        0-d tensor.

    Example:
        >>> d2 = fisher_distance(model, loader, "classification", theta, theta + 1e-3 * v)
    """
    op = CurvatureOperator(model, loader, likelihood, sigma_noise=sigma_noise, subset=subset, io=io)
    theta1 = op.check_vector(theta1, "theta1")
    return fisher_quadratic(op, theta1, theta1 - op.check_vector(theta2, "theta2"))


def kl_between(op: CurvatureOperator, theta1: Tensor | None, theta2: Tensor) -> Tensor:
    """Summed predictive KL from ``θ₁`` (default: the model's parameters) to ``θ₂``, 0-d."""
    params2 = op.params(theta2)

    def work(params: dict[str, Tensor], x: Any, f: Any, y: Tensor) -> Tensor:
        return kl_outputs(op, f, op.outputs_fn(x)(params2)).sum()

    return op.map_batches(work, theta1)


def predictive_kl(
    model: nn.Module,
    loader: Iterable[Any],
    likelihood: str | LikelihoodModel,
    theta1: Tensor,
    theta2: Tensor,
    *,
    sigma_noise: float | Tensor = 1.0,
    subset: SubsetSpec = "all",
    io: ModelIO | None = None,
) -> Tensor:
    """``Σₙ KL(p(y|xₙ,θ₁) ‖ p(y|xₙ,θ₂))``, exact: categorical, Gaussian (the likelihood's
    noise) or Bernoulli.

    Args:
        model: The model (its architecture).
        loader: ``(inputs, targets)`` batches (only the inputs matter).
        likelihood: A registered likelihood name or instance.
        theta1: Flat parameters ``(P,)`` in ``named_parameters()`` order.
        theta2: Flat parameters ``(P,)``.
        sigma_noise: Regression noise.
        subset: Which parameters the vectors cover.
        io: How batches are split and the model is called (mapping batches), as for
            :class:`~laplacefim.Laplace`.

    Returns:
        0-d tensor, ``>= 0``.

    Example:
        >>> kl = predictive_kl(model, loader, "classification", theta, theta + delta)
    """
    op = CurvatureOperator(model, loader, likelihood, sigma_noise=sigma_noise, subset=subset, io=io)
    return kl_between(op, op.check_vector(theta1, "theta1"), theta2)
