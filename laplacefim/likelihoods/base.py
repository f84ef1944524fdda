"""The likelihood protocol: everything that depends on which likelihood the outputs
parametrise lives behind it, so no other module branches on the likelihood.

Conventions (all of laplacefim follows them):

* The loss of a data set is the **sum** of per-datum negative log-likelihoods (never the
  mean), so curvature statistics add over batches and over ranks.
* Every curvature kind is a sum over data of ``Jₙᵀ Mₙ Jₙ`` where ``Jₙ`` is the Jacobian of
  the outputs and ``Mₙ = Σ_v s_v s_vᵀ`` is given by a few *columns* ``s_v`` per datum: the
  columns of a square root of the loss Hessian w.r.t. the outputs (exact GGN), loss
  gradients at labels sampled from the model over √k (MC Fisher), or the loss gradient at
  the true label (empirical Fisher). Each is returned as a ``(V, B, C)`` tensor.
* ``noise`` is the likelihood's observation-noise hyperparameter (``sigma_noise``); a
  likelihood without one (``has_noise = False``) ignores it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from laplacefim.options import CurvatureKind, Link
from laplacefim.prediction import Prediction


@dataclass(frozen=True)
class Targets:
    """Targets checked against the outputs of one batch.

    Attributes:
        values: The targets in the likelihood's working form.
        invalid: A 0-d boolean tensor, True when some target value is out of range; kept on
            the device so that checking it needs no host synchronisation inside the loop.
        count: Number of data the batch holds (its rows, or a 0-d tensor of the tokens that
            are not ignored for token-level targets).
        weight: Where some outputs carry no datum (ignored tokens), a 0/1 weight of the
            outputs' shape without the last dimension, applied to the curvature's columns.
    """

    values: Tensor
    invalid: Tensor
    count: int | Tensor
    weight: Tensor | None = None


@dataclass(frozen=True)
class OutputCurvature:
    """Per-datum output curvature ``M_b = diag(d_b) − l_b l_bᵀ`` and a square root of it.

    Attributes:
        diagonal: ``d`` ``(B, C)``.
        outer: ``l`` ``(B, C)``, or None when ``M_b`` is diagonal.
        root: Returns columns ``(V, B, C)`` with ``Σ_v s_v s_vᵀ = M_b`` (formed only when a
            structure needs the per-datum columns).
        n_columns: ``V``.
    """

    diagonal: Tensor
    outer: Tensor | None
    root: Callable[[], Tensor]
    n_columns: int

    def total(self) -> Tensor:
        """``Σ_b M_b`` ``(C, C)``."""
        out = torch.diag(self.diagonal.sum(0))
        if self.outer is not None:
            out = out - self.outer.T @ self.outer
        return out

    def entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        """``M_b[rows_k, cols_k]`` per datum ``(B, k)``."""
        out = self.diagonal[:, rows] * (rows == cols).to(self.diagonal.dtype)
        if self.outer is not None:
            out = out - self.outer[:, rows] * self.outer[:, cols]
        return out

    def diagonals(self) -> Tensor:
        """``diag(M_b)`` per datum ``(B, C)``."""
        if self.outer is None:
            return self.diagonal
        return self.diagonal - self.outer.square()

    def to(self, dtype: torch.dtype) -> OutputCurvature:
        """In ``dtype``."""
        outer = None if self.outer is None else self.outer.to(dtype)
        root = self.root
        return OutputCurvature(
            self.diagonal.to(dtype), outer, lambda: root().to(dtype), self.n_columns
        )


class LikelihoodModel(Protocol):
    """What a likelihood provides. Register an implementation in
    :data:`laplacefim.likelihoods.LIKELIHOODS` to make it available by name.

    Attributes:
        name: The registry name.
        task: ``"classification"`` (the predictive has class probabilities) or
            ``"regression"`` (a mean and variances), for reports and metrics.
        has_noise: Whether ``sigma_noise`` is a hyperparameter of the likelihood.
        expected_targets: What valid target values are, for error messages.
    """

    name: str
    task: str
    has_noise: bool
    expected_targets: str

    def options(self) -> dict[str, object]:
        """Constructor arguments, plain values (kept when a fit is saved)."""
        ...

    def outputs(self, f: Tensor) -> Tensor:
        """Check the model's outputs and return them as ``(B, C)``."""
        ...

    def targets(self, f: Tensor, y: Tensor) -> Targets:
        """Check targets against outputs ``(B, C)``; raise for a wrong dtype or shape."""
        ...

    def loss_stats(self, f: Tensor, y: Tensor) -> Tensor:
        """A summable statistic of the batch's loss (from which the log-likelihood follows)."""
        ...

    def log_likelihood(self, stats: Tensor, n_data: int, noise: Tensor) -> Tensor:
        """Log-likelihood of the data from their summed loss statistics."""
        ...

    def hessian_sqrt(self, f: Tensor, noise: Tensor) -> Tensor:
        """Columns ``(V, B, C)`` whose outer products sum to the loss Hessian (GGN)."""
        ...

    def output_curvature(self, f: Tensor, noise: Tensor) -> OutputCurvature | None:
        """The loss Hessian w.r.t. outputs ``(B, C)`` as ``diag(d) − l lᵀ`` per datum, with
        :meth:`hessian_sqrt` as its square root; None where it has no such form. It lets a
        last-layer fit avoid ``(C, B, C)`` columns (``B·C²`` work instead of ``B·C³``)."""
        ...

    def sampled_gradients(
        self, f: Tensor, noise: Tensor, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """Loss gradients at labels drawn from the model, over √k: ``(k, B, C)``."""
        ...

    def gradient(self, f: Tensor, y: Tensor, noise: Tensor) -> Tensor:
        """Loss gradient at the true targets: ``(1, B, C)``."""
        ...

    def check_noise(self, noise: Tensor) -> None:
        """Raise ``ValueError`` if ``noise`` does not apply to this likelihood."""
        ...

    def curvature_scale(self, kind: CurvatureKind, noise_fit: Tensor, noise: Tensor) -> Tensor:
        """Factor on a curvature fitted at ``noise_fit`` to make it the one at ``noise``."""
        ...

    def predictive(
        self,
        mean: Tensor,
        cov: Tensor,
        *,
        link: Link,
        noise: Tensor,
        n_samples: int,
        generator: torch.Generator | None,
        joint_outputs: bool,
    ) -> Prediction:
        """The predictive from a Gaussian ``N(mean (B, C), cov (B, C, C))`` over outputs."""
        ...

    def sampled_predictive(
        self, samples: Tensor, *, noise: Tensor, joint_outputs: bool
    ) -> Prediction:
        """The predictive from output samples ``(S, B, C)`` of sampled weights."""
        ...

    def predictive_nll(self, prediction: Prediction, y: Tensor) -> Tensor:
        """Summed negative log predictive density of targets ``y``, float64, 0-d."""
        ...

    def kl(self, f1: Tensor, f2: Tensor, noise: Tensor) -> Tensor:
        """Per-datum ``KL(p(y|f₁) ‖ p(y|f₂))`` for outputs ``(B, C)``: ``(B,)``."""
        ...

    def point_prediction(self, f: Tensor) -> Tensor:
        """The MAP network's prediction: probabilities, or the mean for regression."""
        ...


class NoNoise:
    """Mixin for likelihoods without an observation-noise hyperparameter."""

    name: str
    has_noise = False

    def options(self) -> dict[str, object]:
        """No options."""
        return {}

    def check_noise(self, noise: Tensor) -> None:
        """Only the default noise 1 is accepted."""
        if not bool((noise == 1).all()):
            raise ValueError(
                f"sigma_noise applies to likelihoods with observation noise only, got it with "
                f"likelihood={self.name!r}."
            )

    def curvature_scale(self, kind: CurvatureKind, noise_fit: Tensor, noise: Tensor) -> Tensor:
        """Always 1: the curvature does not depend on a noise."""
        return torch.ones((), dtype=torch.float64, device=noise.device)


def floating_targets(f: Tensor, y: Tensor, n_columns: int, name: str) -> Targets:
    """Finite floating-point targets ``(B, n_columns)`` (``(B,)`` for one column)."""
    if not y.dtype.is_floating_point:
        raise TypeError(
            f"{name} expects floating-point targets, got dtype {y.dtype}; "
            "convert with y.float() (or y.double())."
        )
    if y.ndim == 1:
        y = y[:, None]
    if y.shape != (f.shape[0], n_columns):
        raise ValueError(
            f"{name} expects targets of shape (B, K) = ({f.shape[0]}, {n_columns}), "
            f"got {tuple(y.shape)}."
        )
    return Targets(y.to(f.dtype), ~torch.isfinite(y).all(), f.shape[0])
