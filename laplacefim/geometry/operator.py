"""Matrix-free curvature products over a data set: ``G v`` (GGN = Fisher) and ``H v``.

Conventions (shared by all of :mod:`laplacefim.geometry`):

* The loss is the **sum** over the data of the per-datum negative log-likelihood, so the
  GGN ``G = Σₙ Jₙᵀ Λₙ Jₙ`` and the Hessian ``H = Σₙ ∇²θ ℓₙ`` grow with the data.
* A parameter setting is a flat vector ``(P,)`` of the chosen trainable parameters in
  ``model.named_parameters()`` order, each tensor flattened row-major — the layout of
  ``Laplace.mean``. Parameters outside the subset (and frozen ones) are held fixed.
* The model runs in eval mode (dropout off, batch-norm statistics frozen); each module's
  mode is restored afterwards.
* Several vectors are passed as the rows of a matrix ``(m, P)``; they go through the
  network together (``torch.func.vmap``), one data pass for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from laplacefim import checks
from laplacefim.fitting import eval_mode, model_device
from laplacefim.inputs import ModelIO, to_device
from laplacefim.likelihoods import LikelihoodModel, make_likelihood
from laplacefim.subsets import Selection, SubsetSpec, find_last_linear, select, validate_subset


class Matrix(str, Enum):
    """Which curvature matrix of the summed negative log-likelihood."""

    GGN = "ggn"
    HESSIAN = "hessian"


class CurvatureOperator:
    """The GGN or Hessian of a model's summed NLL over a data set, as a linear operator.

    Building it resolves the subset and (with ``cache_data``) reads the loader once;
    products then cost one pass over the data per block of vectors, never a dense matrix.

    Args:
        model: The model; its current parameters are the default expansion point.
        loader: Iterable of ``(inputs, targets)`` batches, as for :class:`~laplacefim.Laplace`.
        likelihood: A registered likelihood name or instance, as for
            :class:`~laplacefim.Laplace`.
        sigma_noise: Observation noise for regression (scalar or one per output).
        subset: ``"all"``, ``"last_layer"``, a list of parameter names or a callable
            ``(name, param) -> bool``, as in :class:`~laplacefim.Laplace`.
        cache_data: Keep the batches (moved to the model's device) in memory while this
            operator lives, instead of iterating the loader on every pass.
        io: How batches are split and the model is called (mapping batches, keyword
            inputs, picking the output), as for :class:`~laplacefim.Laplace`.

    Raises:
        ValueError: For an empty loader, unknown options or a bad ``sigma_noise``.
        TypeError: For batches that are not ``(inputs, targets)`` pairs.

    Example:
        >>> op = CurvatureOperator(model, loader, "classification")
        >>> gv = op.ggn(torch.randn(3, op.n_params))  # (3, P)
    """

    def __init__(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        likelihood: str | LikelihoodModel,
        *,
        sigma_noise: float | Tensor = 1.0,
        subset: SubsetSpec = "all",
        cache_data: bool = True,
        io: ModelIO | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.likelihood: LikelihoodModel = make_likelihood(likelihood)
        self.noise = checks.hyperparameter(sigma_noise, "sigma_noise", allow_zero=False)
        if self.noise.ndim > 1:
            raise ValueError(
                f"sigma_noise must be a scalar or one value per output, got {sigma_noise!r}."
            )
        self.likelihood.check_noise(self.noise)
        self.io = io or ModelIO()
        subset = validate_subset(subset)
        self.device = model_device(model)
        self._loader = loader
        self._cache: list[tuple[Any, Tensor]] | None = list(self._read()) if cache_data else None
        first = next(iter(self.batches()), None)
        if first is None:
            raise ValueError("the loader yielded no batch; give at least one (inputs, targets).")
        last = find_last_linear(model, first[0], self.io) if subset == "last_layer" else None
        self.selection: Selection = select(model, subset, last)
        self.n_data = sum(int(y.shape[0]) for _, y in self.batches())

    # ------------------------------------------------------------------ layout
    @property
    def names(self) -> tuple[str, ...]:
        """Names of the chosen parameters, in flat order."""
        return self.selection.names

    @property
    def n_params(self) -> int:
        """Number of chosen parameters ``P``."""
        return self.selection.n_params

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the chosen parameters (vectors are cast to it)."""
        return self.selection.params[0].dtype

    def theta(self) -> Tensor:
        """The current chosen parameters, flat ``(P,)``."""
        return self.selection.flat()

    def unflatten(self, rows: Tensor) -> dict[str, Tensor]:
        """Rows ``(m, P)`` as a dict of ``(m, *shape)`` tensors, by parameter name."""
        return self.selection.unflatten(rows)

    def flatten(self, tensors: dict[str, Tensor], batch_dims: int = 1) -> Tensor:
        """Inverse of :meth:`unflatten`."""
        return torch.cat([tensors[n].flatten(batch_dims) for n in self.names], dim=-1)

    def check_vector(self, v: Tensor, name: str = "v") -> Tensor:
        """Cast a vector ``(P,)`` or rows ``(m, P)`` to the parameters' dtype and device."""
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(v).__name__}.")
        if v.ndim not in (1, 2) or v.shape[-1] != self.n_params:
            raise ValueError(
                f"{name} must have shape (P,) or (m, P) with P = {self.n_params} chosen "
                f"parameters (in named_parameters() order), got {tuple(v.shape)}."
            )
        return v.detach().to(dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ data
    def _read(self) -> Iterator[tuple[Any, Tensor]]:
        for index, batch in enumerate(self._loader):
            x, y = self.io.split(batch, index)
            yield to_device(x, self.device), y.to(self.device)

    def batches(self) -> Iterable[tuple[Any, Tensor]]:
        """The ``(inputs, targets)`` batches on the model's device."""
        return self._cache if self._cache is not None else self._read()

    def outputs_fn(self, x: Any) -> Callable[[dict[str, Tensor]], Tensor]:
        """``params -> outputs (B, C)`` of the model on inputs ``x``."""

        def outputs(params: dict[str, Tensor]) -> Tensor:
            return self.likelihood.outputs(self.io.functional_call(self.model, params, x))

        return outputs

    def nll(self, f: Tensor, y: Tensor) -> Tensor:
        """Summed negative log-likelihood (constants included) of outputs ``(B, C)``, 0-d."""
        stats = self.likelihood.loss_stats(f, y)
        return -self.likelihood.log_likelihood(stats, f.shape[0], self.noise.to(f))

    def params(self, theta: Tensor | None) -> dict[str, Tensor]:
        """The chosen parameters (detached) at ``theta`` (default: the model's own)."""
        if theta is None:
            return {n: p.detach() for n, p in zip(self.names, self.selection.params, strict=True)}
        theta = self.check_vector(theta, "theta")
        if theta.ndim != 1:
            raise ValueError(f"theta must be one flat vector (P,), got {tuple(theta.shape)}.")
        return {n: t[0] for n, t in self.unflatten(theta[None]).items()}

    def map_batches(
        self,
        work: Callable[[dict[str, Tensor], Any, Tensor | None, Tensor], Tensor],
        theta: Tensor | None,
        *,
        forward: bool = True,
    ) -> Tensor:
        """Sum ``work(params, x, f, y)`` over the batches, in eval mode, without autograd.

        With ``forward``, ``f`` are the detached outputs ``(B, C)`` and ``y`` the targets
        checked by the likelihood; else ``f`` is None and ``y`` the raw targets, which
        ``work`` checks with :meth:`targets`.

        Raises:
            ValueError: For targets out of range (checked once, after the pass).
        """
        params = self.params(theta)
        total: Tensor | None = None
        self._flags: list[Tensor] = []
        with eval_mode(self.model), torch.no_grad():
            for x, y in self.batches():
                f = None
                if forward:
                    f = self.outputs_fn(x)(params)
                    y = self.targets(f, y)
                part = work(params, x, f, y)
                total = part if total is None else total + part
        if bool(torch.stack(self._flags).any()):
            raise ValueError(
                f"the targets are out of range for likelihood={self.likelihood.name!r}; "
                f"expected {self.likelihood.expected_targets}."
            )
        if total is None:
            raise ValueError("the loader yielded no batch on this pass.")
        return total

    def targets(self, f: Tensor, y: Tensor) -> Tensor:
        """Targets checked against outputs ``f``; range flags are kept for the pass's end."""
        checked = self.likelihood.targets(f.detach(), y)
        self._flags.append(checked.invalid)
        return checked.values

    # ------------------------------------------------------------------ products
    def apply_lambda(self, f: Tensor, u: Tensor) -> Tensor:
        """``Λ u`` per datum for output-space vectors ``u`` ``(m, B, C)``."""
        s = self.likelihood.hessian_sqrt(f, self.noise)  # (V, B, C)
        coef = torch.einsum("vbc,mbc->mvb", s, u)
        return torch.einsum("mvb,vbc->mbc", coef, s)

    def ggn(self, v: Tensor, *, theta: Tensor | None = None) -> Tensor:
        """GGN times vectors: ``Σₙ Jₙᵀ Λₙ Jₙ v``; ``v`` ``(P,)`` or rows ``(m, P)``."""
        v = self.check_vector(v)
        rows = v if v.ndim == 2 else v[None]
        tangents = self.unflatten(rows)

        def work(params: dict[str, Tensor], x: Any, f: Tensor | None, y: Tensor) -> Tensor:
            # One forward with a graph; Jv by double backward through Jᵀu₀ (linear in u₀),
            # then Jᵀ(ΛJv): plain autograd, batched over the vectors.
            leaves = {n: t.detach().requires_grad_() for n, t in params.items()}
            inputs = list(leaves.values())
            with torch.enable_grad():
                out = self.outputs_fn(x)(leaves)
                self.targets(out, y)
                u0 = torch.zeros_like(out, requires_grad=True)
                jt = torch.autograd.grad(out, inputs, u0, create_graph=True, allow_unused=True)
                used = [i for i, g in enumerate(jt) if g is not None]
                jv = torch.autograd.grad(
                    [jt[i] for i in used],
                    u0,
                    [tangents[self.names[i]] for i in used],
                    retain_graph=True,
                    is_grads_batched=True,
                )[0]
                u = self.apply_lambda(out.detach(), jv)
                back = torch.autograd.grad(out, inputs, u, is_grads_batched=True, allow_unused=True)
            return torch.cat(
                [
                    (g if g is not None else torch.zeros_like(tangents[n])).flatten(1)
                    for n, g in zip(self.names, back, strict=True)
                ],
                dim=1,
            )

        result = self.map_batches(work, theta, forward=False)
        return result if v.ndim == 2 else result[0]

    def hessian(self, v: Tensor, *, theta: Tensor | None = None) -> Tensor:
        """Hessian of the summed NLL times vectors; ``v`` ``(P,)`` or rows ``(m, P)``."""
        v = self.check_vector(v)
        rows = v if v.ndim == 2 else v[None]
        tangents = self.unflatten(rows)

        def work(params: dict[str, Tensor], x: Any, f: Tensor | None, y: Tensor) -> Tensor:
            fn = self.outputs_fn(x)

            def loss(p: dict[str, Tensor]) -> Tensor:
                return self.nll(fn(p), y)

            out = vmap(lambda t: jvp(grad(loss), (params,), (t,))[1])(tangents)
            return self.flatten(out)

        result = self.map_batches(work, theta)
        return result if v.ndim == 2 else result[0]

    def matmat(self, matrix: Matrix, v: Tensor, *, theta: Tensor | None = None) -> Tensor:
        """``ggn`` or ``hessian`` by option."""
        return self.ggn(v, theta=theta) if matrix is Matrix.GGN else self.hessian(v, theta=theta)


def ggn_vector_product(
    model: nn.Module,
    loader: Iterable[Any],
    likelihood: str | LikelihoodModel,
    v: Tensor,
    *,
    sigma_noise: float | Tensor = 1.0,
    subset: SubsetSpec = "all",
    io: ModelIO | None = None,
) -> Tensor:
    """GGN (= Fisher) of the summed NLL times ``v``, matrix-free: ``Σₙ Jₙᵀ Λₙ Jₙ v``.

    Per batch: one forward with a graph, ``Jv`` by double backward, the loss Hessian of
    the outputs ``Λ`` from the likelihood, and one backward (``Jᵀ·``); several vectors
    share one pass (``is_grads_batched``).

    Args:
        model: The model, at the expansion point.
        loader: ``(inputs, targets)`` batches.
        likelihood: A registered likelihood name or instance.
        v: A flat vector ``(P,)`` or rows ``(m, P)``, in ``named_parameters()`` order.
        sigma_noise: Regression noise.
        subset: Which parameters (as in :class:`~laplacefim.Laplace`).
        io: How batches are split and the model is called (mapping batches), as for
            :class:`~laplacefim.Laplace`.

    Returns:
        ``G v`` of ``v``'s shape.

    Example:
        >>> gv = ggn_vector_product(model, loader, "classification", torch.ones(P))
    """
    op = CurvatureOperator(model, loader, likelihood, sigma_noise=sigma_noise, subset=subset, io=io)
    return op.ggn(v)


def hessian_vector_product(
    model: nn.Module,
    loader: Iterable[Any],
    likelihood: str | LikelihoodModel,
    v: Tensor,
    *,
    sigma_noise: float | Tensor = 1.0,
    subset: SubsetSpec = "all",
    io: ModelIO | None = None,
) -> Tensor:
    """Hessian of the summed NLL times ``v`` (forward-over-reverse, ``torch.func``).

    Args:
        model: The model, at the expansion point.
        loader: ``(inputs, targets)`` batches.
        likelihood: A registered likelihood name or instance.
        v: A flat vector ``(P,)`` or rows ``(m, P)``, in ``named_parameters()`` order.
        sigma_noise: Regression noise.
        subset: Which parameters.
        io: How batches are split and the model is called (mapping batches), as for
            :class:`~laplacefim.Laplace`.

    Returns:
        ``H v`` of ``v``'s shape.

    Example:
        >>> hv = hessian_vector_product(model, loader, "regression", v, sigma_noise=0.1)
    """
    op = CurvatureOperator(model, loader, likelihood, sigma_noise=sigma_noise, subset=subset, io=io)
    return op.hessian(v)
