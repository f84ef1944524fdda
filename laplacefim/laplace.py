"""The ``Laplace`` front door: choose parameters, fit curvature, read the posterior."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from laplacefim.curvature import CurvatureEngine
from laplacefim.likelihoods import make_likelihood
from laplacefim.options import CurvatureKind, Likelihood, Structure, parse_option
from laplacefim.precision import PosteriorPrecision
from laplacefim.structures import BlockDiagonal
from laplacefim.subsets import Selection, SubsetSpec, find_last_linear, select, validate_subset

# A full (P, P) curvature is refused above this many parameters (20,000² float32 ≈ 1.6 GB).
MAX_FULL_PARAMS = 20_000


@dataclass(frozen=True)
class _Fit:
    """Everything a successful fit produced; swapped in whole so a failed fit changes nothing."""

    selection: Selection
    last_layer: str | None
    curvature: BlockDiagonal
    mean: Tensor
    loss_stats: Tensor
    n_data: int


def _positive(value: Any, name: str, *, allow_zero: bool) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, int | float | Tensor):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}.")
    # Python numbers are kept in float64 and cast where they are used, so that a float64
    # model sees exactly the value given.
    tensor = (
        value.detach()
        if isinstance(value, Tensor)
        else torch.tensor(float(value), dtype=torch.float64)
    )
    if not tensor.dtype.is_floating_point:
        tensor = tensor.to(torch.float64)
    bad = ~torch.isfinite(tensor) | (tensor < 0 if allow_zero else tensor <= 0)
    if bad.any():
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}.")
    return tensor


def _unpack(batch: object, index: int) -> tuple[object, Tensor]:
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        kind = type(batch).__name__
        size = f" of length {len(batch)}" if isinstance(batch, tuple | list) else ""
        raise TypeError(
            f"the loader yielded a {kind}{size} as batch {index}; laplacefim expects "
            "(inputs, targets) pairs, as a TensorDataset in a DataLoader yields."
        )
    x, y = batch
    if not isinstance(y, Tensor):
        raise TypeError(f"batch {index}: targets must be a tensor, got {type(y).__name__}.")
    return x, y


class Laplace:
    """A Laplace approximation ``N(θ*, (F / T + P₀)⁻¹)`` around a trained model.

    ``F`` is a curvature of the summed negative log-likelihood over the training data: the
    exact generalised Gauss-Newton matrix (equal to the Fisher information for these
    likelihoods), a Monte-Carlo Fisher, or the empirical Fisher; ``T`` is the temperature
    and ``P₀`` the (diagonal) prior precision.

    Args:
        model: The trained model. Its parameters with ``requires_grad=False`` are never
            part of the posterior.
        likelihood: ``"classification"`` (logits ``(B, C)``), ``"regression"`` (Gaussian
            noise, outputs ``(B, K)``) or ``"binary"`` (one logit).
        subset: ``"all"``, ``"last_layer"`` (the last ``nn.Linear`` executed, found during
            fit), a list of parameter names, or a callable ``(name, param) -> bool``.
        structure: ``"kron"`` (KFAC; parameters without a Kronecker rule get diagonal
            blocks), ``"diag"`` or ``"full"``.
        curvature: ``"ggn"``, ``"fisher"`` (Monte-Carlo labels) or ``"empirical_fisher"``.
        prior_precision: Prior precision, a float or a tensor ``(P,)``; ``>= 0``.
        sigma_noise: Observation noise for regression, a float or one value per output.
        temperature: Posterior temperature; the curvature is divided by it.
        fisher_samples: Labels drawn per datum for ``curvature="fisher"``.
        accumulate_dtype: Dtype in which statistics are formed and summed (for example
            ``torch.float64``); the parameters' dtype by default.
        max_full_params: Largest number of parameters accepted with ``structure="full"``.

    Raises:
        ValueError: For an option value that is not valid; the message lists valid ones.
        TypeError: For an argument of the wrong type.

    Example:
        >>> la = Laplace(model, "classification", subset="last_layer", structure="kron")
        >>> la.fit(train_loader)
        >>> la.posterior_precision.diagonal().shape
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "classification",
        *,
        subset: SubsetSpec = "all",
        structure: str | Structure = "kron",
        curvature: str | CurvatureKind = "ggn",
        prior_precision: float | Tensor = 1.0,
        sigma_noise: float | Tensor = 1.0,
        temperature: float = 1.0,
        fisher_samples: int = 1,
        accumulate_dtype: torch.dtype | None = None,
        max_full_params: int = MAX_FULL_PARAMS,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.likelihood = parse_option(likelihood, Likelihood, "likelihood")
        self.subset = validate_subset(subset)
        self.structure = parse_option(structure, Structure, "structure")
        self.curvature_kind = parse_option(curvature, CurvatureKind, "curvature")
        sigma = _positive(sigma_noise, "sigma_noise", allow_zero=False)
        if self.likelihood is not Likelihood.REGRESSION and not bool((sigma == 1).all()):
            raise ValueError(
                f"sigma_noise applies to likelihood='regression' only, got it with "
                f"likelihood={self.likelihood.value!r}."
            )
        if sigma.ndim > 1:
            raise ValueError(
                f"sigma_noise must be a scalar or (K,), got shape {tuple(sigma.shape)}."
            )
        self.sigma_noise = sigma
        self.temperature = float(_positive(temperature, "temperature", allow_zero=False))
        if (
            isinstance(fisher_samples, bool)
            or not isinstance(fisher_samples, int)
            or fisher_samples < 1
        ):
            raise ValueError(f"fisher_samples must be an integer >= 1, got {fisher_samples!r}.")
        self.fisher_samples = fisher_samples
        if accumulate_dtype is not None and not (
            isinstance(accumulate_dtype, torch.dtype) and accumulate_dtype.is_floating_point
        ):
            raise TypeError(
                "accumulate_dtype must be a floating torch.dtype or None, "
                f"got {accumulate_dtype!r}."
            )
        self.accumulate_dtype = accumulate_dtype
        self.max_full_params = max_full_params
        self.prior_precision = prior_precision
        self._fit: _Fit | None = None

    # ---------------------------------------------------------------- options
    @property
    def prior_precision(self) -> Tensor:
        """Prior precision: a 0-d tensor or one value per parameter ``(P,)``."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        prior = _positive(value, "prior_precision", allow_zero=True)
        if prior.ndim > 1:
            raise ValueError(
                "prior_precision must be a scalar or a (P,) tensor, "
                f"got shape {tuple(prior.shape)}."
            )
        fit = getattr(self, "_fit", None)
        if fit is not None and prior.ndim == 1 and prior.numel() != fit.selection.n_params:
            raise ValueError(
                f"prior_precision has {prior.numel()} values but the posterior covers "
                f"{fit.selection.n_params} parameters."
            )
        self._prior_precision = prior

    # ---------------------------------------------------------------- fitted state
    def _fitted(self) -> _Fit:
        if self._fit is None:
            raise RuntimeError("this Laplace has not been fitted; call la.fit(train_loader) first.")
        return self._fit

    @property
    def n_params(self) -> int:
        """Number of parameters ``P`` the posterior covers."""
        return self._fitted().selection.n_params

    @property
    def n_data(self) -> int:
        """Number of data the curvature was fitted on."""
        return self._fitted().n_data

    @property
    def mean(self) -> Tensor:
        """The posterior mean: the chosen parameters at fit time, flat ``(P,)``."""
        return self._fitted().mean

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """Names of the chosen parameters, in flat order."""
        return self._fitted().selection.names

    @property
    def last_layer(self) -> str | None:
        """Name of the module found as the last layer (``subset="last_layer"`` only)."""
        return self._fitted().last_layer

    @property
    def log_likelihood(self) -> Tensor:
        """Log-likelihood of the training data at the mean, tempered: ``−Σ nll / T``."""
        fit = self._fitted()
        likelihood = make_likelihood(self.likelihood, self.sigma_noise)
        sigma = self.sigma_noise.to(fit.loss_stats)
        return likelihood.log_likelihood(fit.loss_stats, fit.n_data, sigma) / self.temperature

    @property
    def curvature(self) -> BlockDiagonal:
        """The fitted curvature ``F`` (summed over data, before temperature and prior)."""
        return self._fitted().curvature

    @property
    def posterior_precision(self) -> PosteriorPrecision:
        """The posterior precision ``F / T + P₀`` in the fitted structure."""
        fit = self._fitted()
        prior = self._prior_precision.to(
            device=fit.mean.device, dtype=fit.curvature.state()[0].dtype
        )
        return PosteriorPrecision(
            fit.curvature, 1.0 / self.temperature, prior.expand(fit.selection.n_params)
        )

    # ---------------------------------------------------------------- fit
    def fit(
        self,
        train_loader: Iterable[Any],
        *,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> Laplace:
        """Accumulate the curvature over the data, replacing any earlier fit.

        The model runs in eval mode during the fit (each module's mode is restored after).
        If anything fails, the object is left exactly as it was.

        Args:
            train_loader: Iterable of ``(inputs, targets)`` batches, such as a DataLoader.
            progress: Show a progress bar.
            generator: Random generator for ``curvature="fisher"``, on the model's device.

        Returns:
            ``self``.

        Raises:
            ValueError: For an empty loader, outputs that are NaN or infinite, targets out
                of range, or a subset that selects nothing trainable.
            TypeError: For batches that are not ``(inputs, targets)`` pairs, or targets of the
                wrong dtype.
        """
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            self._fit = self._run_fit(train_loader, progress, generator)
        finally:
            for module, training in modes.items():
                module.training = training
        return self

    def _run_fit(
        self, loader: Iterable[Any], progress: bool, generator: torch.Generator | None
    ) -> _Fit:
        device = next(self.model.parameters()).device
        total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        engine: CurvatureEngine | None = None
        accumulator: BlockDiagonal | None = None
        selection: Selection | None = None
        last_layer: str | None = None
        loss_stats: Tensor | None = None
        n_data = 0
        flags: list[Tensor] = []
        bar = tqdm(loader, total=total, disable=not progress, desc="laplacefim fit", unit="batch")
        for index, batch in enumerate(bar):
            x, y = _unpack(batch, index)
            if isinstance(x, Tensor):
                x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if engine is None:
                if self.subset == "last_layer":
                    last_layer = find_last_linear(self.model, x)
                selection = select(self.model, self.subset, last_layer)
                engine = self._engine(selection)
                accumulator = engine.zeros()
            try:
                stats = engine.batch(x, y, generator)
            except (ValueError, TypeError) as error:
                raise type(error)(f"batch {index}: {error}") from error
            accumulator.add_(stats.contributions)  # type: ignore[union-attr]
            loss_stats = stats.loss_stats if loss_stats is None else loss_stats + stats.loss_stats
            n_data += stats.n_data
            flags.append(torch.stack([stats.bad_outputs, stats.bad_targets]))
        if engine is None or accumulator is None or selection is None or loss_stats is None:
            raise ValueError(
                "the loader yielded no batch; fit needs at least one (inputs, targets) batch."
            )
        self._raise_on_flags(torch.stack(flags))
        return _Fit(selection, last_layer, accumulator, selection.flat(), loss_stats, n_data)

    def _engine(self, selection: Selection) -> CurvatureEngine:
        if self.structure is Structure.FULL and selection.n_params > self.max_full_params:
            raise ValueError(
                f"structure='full' over {selection.n_params} parameters would need a "
                f"{selection.n_params}² matrix (limit max_full_params={self.max_full_params}); "
                "use structure='kron' or 'diag', or subset='last_layer'."
            )
        if self._prior_precision.ndim == 1 and self._prior_precision.numel() != selection.n_params:
            raise ValueError(
                f"prior_precision has {self._prior_precision.numel()} values but the subset "
                f"covers {selection.n_params} parameters."
            )
        dtype = self.accumulate_dtype or selection.params[0].dtype
        return CurvatureEngine(
            self.model,
            selection,
            self.structure,
            self.curvature_kind,
            make_likelihood(self.likelihood, self.sigma_noise),
            fisher_samples=self.fisher_samples,
            dtype=dtype,
        )

    def _raise_on_flags(self, flags: Tensor) -> None:
        bad = flags.any(dim=0).tolist()  # one host sync, after the loop
        if bad[0]:
            index = int(flags[:, 0].nonzero()[0])
            raise ValueError(
                f"the model's outputs in batch {index} contain NaN or inf; check that batch's "
                "inputs and the model's weights."
            )
        if bad[1]:
            index = int(flags[:, 1].nonzero()[0])
            expected = {
                Likelihood.CLASSIFICATION: "class labels in [0, C)",
                Likelihood.REGRESSION: "finite targets",
                Likelihood.BINARY: "targets equal to 0 or 1",
            }[self.likelihood]
            raise ValueError(f"batch {index} has targets out of range; expected {expected}.")

    def __repr__(self) -> str:
        fitted = (
            f"n_params={self.n_params}, n_data={self.n_data}"
            if self._fit is not None
            else "not fitted"
        )
        return (
            f"Laplace(likelihood={self.likelihood.value!r}, subset={self.subset!r}, "
            f"structure={self.structure.value!r}, curvature={self.curvature_kind.value!r}, "
            f"{fitted})"
        )


__all__ = ["MAX_FULL_PARAMS", "Laplace"]
