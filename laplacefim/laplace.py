"""The ``Laplace`` front door: choose parameters, fit curvature, read the posterior."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from pyro.distributions import MultivariateNormal, Normal, TorchDistribution
from torch import Tensor, nn

from laplacefim import distributed, persistence, tuning
from laplacefim.curvature import CurvatureEngine
from laplacefim.distributions import BlockDiagonalNormal
from laplacefim.fitting import FitState, eval_mode, layout_of, run_fit, unpack
from laplacefim.likelihoods import make_likelihood
from laplacefim.marglik import Evidence, PriorTuning
from laplacefim.optim import NaturalGradient
from laplacefim.options import (
    CurvatureKind,
    Likelihood,
    Link,
    PredictMethod,
    PriorStructure,
    Structure,
    TuneMethod,
    parse_option,
)
from laplacefim.precision import PosteriorPrecision
from laplacefim.predictive import (
    Prediction,
    gaussian_prediction,
    glm_moments,
    linearised_samples,
    sampled_outputs,
    sampled_prediction,
)
from laplacefim.structures import BlockDiagonal
from laplacefim.structures.eigen import CurvatureEigen, PrecisionEigen
from laplacefim.subsets import Selection, SubsetSpec, validate_subset

# A full (P, P) curvature is refused above this many parameters (20,000² float32 ≈ 1.6 GB).
MAX_FULL_PARAMS = 20_000


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
        self._fit: FitState | None = None
        self._stale = False
        self._eigens: list[CurvatureEigen] | None = None
        self.sigma_noise = sigma_noise
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

    # ---------------------------------------------------------------- options
    @property
    def prior_precision(self) -> Tensor:
        """Prior precision: 0-d, one value per layer ``(L,)`` or per parameter ``(P,)``."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        prior = _positive(value, "prior_precision", allow_zero=True)
        if prior.ndim > 1:
            raise ValueError(
                "prior_precision must be a scalar, one value per layer (L,) or per parameter "
                f"(P,), got shape {tuple(prior.shape)}."
            )
        if self._fit is not None:
            self._fit.layout.prior_structure(prior)
        self._prior_precision = prior

    @property
    def sigma_noise(self) -> Tensor:
        """Observation noise of the regression likelihood: 0-d or one per output ``(K,)``."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        sigma = _positive(value, "sigma_noise", allow_zero=False)
        if self.likelihood is not Likelihood.REGRESSION and not bool((sigma == 1).all()):
            raise ValueError(
                f"sigma_noise applies to likelihood='regression' only, got it with "
                f"likelihood={self.likelihood.value!r}."
            )
        if sigma.ndim > 1:
            raise ValueError(
                f"sigma_noise must be a scalar or (K,), got shape {tuple(sigma.shape)}."
            )
        if self._fit is not None:
            self._scale(sigma)  # raises if the fitted curvature cannot follow this noise
        self._sigma_noise = sigma

    # ---------------------------------------------------------------- fitted state
    def _fitted(self) -> FitState:
        if self._stale:
            raise RuntimeError(
                "the model changed in finetune(refit=False), so this posterior is stale; "
                "call la.fit(train_loader) again."
            )
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
        return self._log_likelihood(self.sigma_noise)

    def _log_likelihood(self, sigma: Tensor) -> Tensor:
        fit = self._fitted()
        likelihood = make_likelihood(self.likelihood, sigma)
        stats = fit.loss_stats.to(torch.float64)
        return likelihood.log_likelihood(stats, fit.n_data, sigma.to(stats)) / self.temperature

    def _scale(self, sigma: Tensor) -> Tensor:
        """Factor on the fitted curvature for noise ``sigma``: ``1/T`` times the noise ratio.

        The fitted curvature carries the noise of the fit, ``σ_fit``; a scalar noise
        rescales it by ``(σ_fit/σ)²`` (GGN, Fisher) or ``(σ_fit/σ)⁴`` (empirical Fisher).
        """
        fit = self._fitted()
        scale = torch.tensor(1.0 / self.temperature, dtype=torch.float64, device=fit.mean.device)
        if self.likelihood is not Likelihood.REGRESSION:
            return scale
        sigma_fit = fit.sigma_fit.to(device=fit.mean.device)
        sigma = sigma.to(device=fit.mean.device)
        if sigma_fit.ndim > 0 or sigma.ndim > 0:
            if sigma.shape != sigma_fit.shape or not bool((sigma == sigma_fit).all()):
                raise ValueError(
                    "a per-output sigma_noise is part of the fitted curvature; refit to change "
                    "it (only a scalar sigma_noise can change after the fit)."
                )
            return scale
        power = 4 if self.curvature_kind is CurvatureKind.EMPIRICAL_FISHER else 2
        return scale * (sigma_fit / sigma) ** power

    @property
    def curvature(self) -> BlockDiagonal:
        """The fitted curvature ``F`` (summed over data, before temperature and prior)."""
        return self._fitted().curvature

    @property
    def posterior_precision(self) -> PosteriorPrecision:
        """The posterior precision ``s·F + P₀`` in the fitted structure (``s = 1/T``, times
        ``(σ_fit/σ)²`` when the regression noise changed after the fit)."""
        fit = self._fitted()
        dtype = fit.curvature.state()[0].dtype
        prior = self._prior_precision.to(device=fit.mean.device, dtype=dtype)
        scale = float(self._scale(self.sigma_noise))
        return PosteriorPrecision(fit.curvature, scale, fit.layout.per_param(prior))

    # ---------------------------------------------------------------- evidence
    def _evidence(self) -> Evidence:
        fit = self._fitted()
        if self._eigens is None:
            self._eigens = [block.decompose() for block in fit.curvature.blocks]
        # The evidence is summed in float64 whatever the model's dtype: tuning compares values
        # of order N to a tolerance far below float32's resolution there.
        theta = fit.mean.to(torch.float64)
        return Evidence(self._eigens, fit.layout, theta, self._log_likelihood, self._scale)

    def _hyper(self, value: float | Tensor | None, default: Tensor, name: str) -> Tensor:
        """A prior or noise value for the evidence: kept differentiable, checked > 0."""
        if value is None:
            value = default
        tensor = (
            value if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
        )
        fit = self._fitted()
        tensor = tensor.to(device=fit.mean.device, dtype=torch.float64)
        if not bool((torch.isfinite(tensor) & (tensor > 0)).all()):
            raise ValueError(f"{name} must be finite and > 0 for the evidence, got {value!r}.")
        return tensor

    def log_marginal_likelihood(
        self,
        prior_precision: float | Tensor | None = None,
        sigma_noise: float | Tensor | None = None,
    ) -> Tensor:
        """The Laplace evidence ``log p(D|θ*) − ½ θ*ᵀP₀θ* − ½ log(det P / det P₀)``.

        The prior mean is 0 and ``P = s·F + P₀`` the posterior precision. After one
        decomposition (cached) each evaluation costs O(P) for diagonal and KFAC; it is
        differentiable in both arguments and never changes the object.

        Args:
            prior_precision: Prior to evaluate at (0-d, ``(L,)`` or ``(P,)``); the current
                one if None.
            sigma_noise: Regression noise to evaluate at; the current one if None.

        Returns:
            A 0-d tensor.

        Raises:
            ValueError: For a prior or noise that is not finite and > 0.

        Example:
            >>> la.log_marginal_likelihood(torch.tensor(2.0, requires_grad=True)).backward()
        """
        prior = self._hyper(prior_precision, self._prior_precision, "prior_precision")
        sigma = self._hyper(sigma_noise, self._sigma_noise, "sigma_noise")
        return self._evidence()(prior, sigma)

    def tune_prior(
        self,
        method: str | TuneMethod = "marglik",
        prior_structure: str | PriorStructure = "scalar",
        *,
        tune_noise: bool = True,
        val_loader: Iterable[Any] | None = None,
        grid: Tensor | None = None,
        tol: float = 1e-10,
        max_iter: int = 100,
    ) -> PriorTuning:
        """Tune the prior precision (and, for regression, the noise) and set them.

        ``method="marglik"`` maximises the log marginal likelihood on the decomposed
        spectrum: Newton's method on the log-hyperparameters for a ``"scalar"`` prior or a
        ``"layerwise"`` one (one value per module), stopping when the predicted gain falls
        below ``tol``; MacKay's fixed point for a ``"diagonal"`` prior (one per parameter;
        diagonal and full structures only), stopping when the relative change falls below
        ``tol``. ``method="gridsearch"`` picks the scalar prior in ``grid`` (default
        ``10⁻⁴ … 10⁴``, 21 values) with the lowest NLL of the GLM probit predictive on
        ``val_loader``.

        Args:
            method: ``"marglik"`` or ``"gridsearch"``.
            prior_structure: ``"scalar"``, ``"layerwise"`` or ``"diagonal"``.
            tune_noise: For regression, also tune a scalar ``sigma_noise`` (marglik).
            val_loader: Validation batches, for ``"gridsearch"``.
            grid: Candidate prior precisions, for ``"gridsearch"``.
            tol: Convergence tolerance.
            max_iter: Largest number of iterations.

        Returns:
            The tuned values, the evidence there, and the iteration count.

        Raises:
            ValueError: For an unknown option, a diagonal prior with ``structure="kron"``,
                noise tuning with a per-output noise, or gridsearch without ``val_loader``.

        Example:
            >>> result = la.tune_prior()
            >>> result.prior_precision, result.n_iter
        """
        return tuning.tune_prior(
            self,
            method,
            prior_structure,
            tune_noise=tune_noise,
            val_loader=val_loader,
            grid=grid,
            tol=tol,
            max_iter=max_iter,
        )

    # ---------------------------------------------------------------- posterior
    def _precisions(self) -> list[PrecisionEigen]:
        """Decomposed posterior-precision blocks at the current prior and noise."""
        fit = self._fitted()
        prior = self._prior_precision.to(device=fit.mean.device, dtype=torch.float64)
        sigma = self._sigma_noise.to(device=fit.mean.device, dtype=torch.float64)
        dtype = fit.curvature.state()[0].dtype
        blocks = [block.to(dtype) for block in self._evidence().precision(prior, sigma)]
        # With a positive prior every eigenvalue is >= the prior. Where the prior has zeros,
        # an eigenvalue below P·eps of the largest is zero up to rounding: a null direction.
        floor = 0.0
        if not bool((self._prior_precision > 0).all()):
            largest = max(float(block.values.max()) for block in blocks)
            floor = fit.mean.numel() * torch.finfo(fit.mean.dtype).eps * largest
        bad = sum(int((~(block.values > floor)).sum()) for block in blocks)
        if bad:
            raise ValueError(
                f"the posterior precision is singular: {bad} of its eigenvalues are zero "
                f"(prior_precision={self._prior_precision.tolist()}); use a prior precision > 0, "
                "for example la.prior_precision = 1.0 or la.tune_prior()."
            )
        return blocks

    @property
    def posterior(self) -> TorchDistribution:
        """The posterior over the flat chosen parameters as a pyro distribution.

        ``structure="full"``: ``MultivariateNormal``; ``"diag"``: ``Normal(...).to_event(1)``;
        ``"kron"``: a :class:`BlockDiagonalNormal` of Kronecker, dense and diagonal blocks.
        """
        fit = self._fitted()
        blocks = self._precisions()
        if self.structure is Structure.FULL:
            return MultivariateNormal(fit.mean, precision_matrix=blocks[0].precision())
        if self.structure is Structure.DIAG:
            scale = torch.cat([block.values for block in blocks]).rsqrt()
            return Normal(fit.mean, scale).to_event(1)
        return BlockDiagonalNormal(fit.mean, blocks)

    def sample(self, n_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Weight samples from the posterior, ``(n_samples, P)``.

        Args:
            n_samples: Number of samples.
            generator: Random generator on the model's device.
        """
        fit = self._fitted()
        blocks = self._precisions()
        z = torch.randn(
            (n_samples, fit.mean.numel()),
            dtype=fit.mean.dtype,
            device=fit.mean.device,
            generator=generator,
        )
        parts = z.split([block.values.numel() for block in blocks], dim=1)
        return fit.mean + torch.cat(
            [block.sample(part) for block, part in zip(blocks, parts, strict=True)], dim=1
        )

    def _inputs(self, x: Tensor) -> Tensor:
        fit = self._fitted()
        if not isinstance(x, Tensor):
            raise TypeError(f"inputs must be a tensor, got {type(x).__name__}.")
        if x.device != fit.mean.device:
            raise ValueError(
                f"inputs are on {x.device} but the model is on {fit.mean.device}; "
                f"move them with x.to({str(fit.mean.device)!r})."
            )
        if fit.input_shape is not None and tuple(x.shape[1:]) != fit.input_shape:
            raise ValueError(
                f"inputs of shape {tuple(x.shape)} do not match the training inputs "
                f"(B, {', '.join(map(str, fit.input_shape))})."
            )
        return x

    def predict(
        self,
        x: Tensor,
        method: str | PredictMethod = "glm",
        link: str | Link = "probit",
        n_samples: int = 100,
        *,
        generator: torch.Generator | None = None,
        joint_outputs: bool = False,
        chunk_size: int = 256,
    ) -> Prediction:
        """Predictive distribution at inputs ``x``.

        ``method="glm"`` linearises the model around the mean: the outputs are Gaussian
        with covariance ``J Σ Jᵀ``, computed per layer from captured inputs and output
        gradients (no Jacobian except for a full all-weights posterior), and ``link``
        turns it into probabilities: ``"probit"`` (closed-form approximation), ``"mc"``
        (``n_samples`` logit samples), ``"bridge"`` (Laplace bridge to a Dirichlet).
        ``method="nn"`` samples ``n_samples`` weight vectors and runs the network.

        Args:
            x: Inputs ``(B, ...)`` on the model's device, shaped like the training inputs.
            method: ``"glm"`` or ``"nn"``.
            link: ``"probit"``, ``"mc"`` or ``"bridge"`` (classification, GLM only).
            n_samples: Samples for ``link="mc"`` and ``method="nn"``.
            generator: Random generator on the model's device.
            joint_outputs: Also return the output covariance ``(B, C, C)``.
            chunk_size: Inputs processed at a time (bounds the memory).

        Returns:
            A :class:`Prediction`.

        Raises:
            RuntimeError: Before ``fit``.
            ValueError: For inputs on another device or of another shape than the training
                inputs, unknown options, or a singular posterior precision.

        Example:
            >>> probs = la.predict(x_test).probs
        """
        method = parse_option(method, PredictMethod, "method")
        link = parse_option(link, Link, "link")
        fit = self._fitted()
        x = self._inputs(x)
        with eval_mode(self.model):
            if method is PredictMethod.NN:
                weights = self.sample(n_samples, generator=generator)
                outputs = sampled_outputs(
                    self.model, fit.selection.params, weights, x, chunk_size=chunk_size
                )
                return sampled_prediction(
                    self.likelihood,
                    outputs.to(fit.mean.dtype),
                    sigma_noise=self._sigma_noise,
                    joint_outputs=joint_outputs,
                )
            engine = self._engine(fit.selection)
            mean, cov = glm_moments(engine, fit.curvature.blocks, self._precisions(), x, chunk_size)
        return gaussian_prediction(
            self.likelihood,
            mean,
            cov,
            link=link,
            sigma_noise=self._sigma_noise,
            n_samples=n_samples,
            generator=generator,
            joint_outputs=joint_outputs,
        )

    def __call__(self, x: Tensor, **options: Any) -> Prediction:
        """Shorthand for :meth:`predict`."""
        return self.predict(x, **options)

    def predictive_samples(
        self,
        x: Tensor,
        n_samples: int,
        *,
        generator: torch.Generator | None = None,
        chunk_size: int = 256,
    ) -> Tensor:
        """Function samples of the linearised model, ``(S, B, C)`` (or ``(S, B, K)``).

        Each sample uses one weight draw for all inputs, so samples are jointly correct:
        their covariance across inputs is the GLM's ``J(x) Σ J(x')ᵀ``.

        Args:
            x: Inputs ``(B, ...)``.
            n_samples: Number of function samples ``S``.
            generator: Random generator on the model's device.
            chunk_size: Inputs processed at a time.
        """
        fit = self._fitted()
        x = self._inputs(x)
        deltas = self.sample(n_samples, generator=generator) - fit.mean
        with eval_mode(self.model):
            return linearised_samples(
                self.model, fit.selection.names, deltas, x, chunk_size=chunk_size
            )

    # ---------------------------------------------------------------- fine-tuning
    def finetune(
        self,
        train_loader: Iterable[Any],
        *,
        epochs: int = 1,
        lr: float = 0.3,
        refit: bool = True,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> Laplace:
        """Natural-gradient fine-tuning of the chosen parameters on the MAP objective.

        Each step minimises the batch-mean negative log-likelihood plus the Gaussian prior
        ``½ P₀ ‖θ‖² / N``, preconditioned by the curvature (plus prior and damping) of
        this posterior: the fitted curvature is the starting point of the moving average.
        Afterwards the posterior is refitted at the new mode, or, with ``refit=False``,
        marked stale (using it raises until the next ``fit``).

        Args:
            train_loader: ``(inputs, targets)`` batches.
            epochs: Passes over the data.
            lr: Step size of the natural-gradient steps.
            refit: Refit the posterior at the new mode.
            generator: Random generator for the MC Fisher statistics.
            **options: Passed to :class:`~laplacefim.optim.NaturalGradient` (``damping``,
                ``ema_decay``, ``update_interval``, ``decompose_interval``, ...);
                ``kl_clip`` defaults to 1e-3 here (unclipped steps of size 1 can diverge).

        Returns:
            ``self``.

        Example:
            >>> la.fit(loader).tune_prior(); la.finetune(loader, epochs=2, lr=0.5)
        """
        fit = self._fitted()
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}.")
        prior = float(fit.layout.per_param(self._prior_precision.to(fit.mean)).mean())
        curvature = options.pop("curvature", self.curvature_kind)
        options.setdefault("kl_clip", 1e-3)
        ngd = NaturalGradient(
            self.model,
            self.likelihood,
            n_data=fit.n_data,
            structure=self.structure,
            curvature=curvature,
            subset=list(fit.selection.names),
            prior_precision=prior,
            lr=lr,
            sigma_noise=float(self._sigma_noise.reshape(-1)[0]),
            **options,
        )
        if ngd.curvature_kind is self.curvature_kind:
            ngd.set_statistics(fit.curvature, fit.n_data)
        likelihood = make_likelihood(self.likelihood, self._sigma_noise)
        device = fit.mean.device
        for _ in range(epochs):
            for index, batch in enumerate(train_loader):
                x, y = unpack(batch, index)
                x = x.to(device) if isinstance(x, Tensor) else x
                y = y.to(device)
                for p in fit.selection.params:
                    p.grad = None
                f = likelihood.outputs(self.model(x))
                targets = likelihood.targets(f.detach(), y)
                stats = likelihood.loss_stats(f, targets.values)
                nll = (
                    -likelihood.log_likelihood(stats, f.shape[0], self._sigma_noise.to(f))
                    / f.shape[0]
                )
                theta = torch.cat([p.reshape(-1) for p in fit.selection.params])
                (nll + 0.5 * prior * theta.square().sum() / fit.n_data).backward()
                ngd.step(x, y, generator=generator)
        if refit:
            self.fit(train_loader, generator=generator)
        else:
            self._stale = True
        return self

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """Options, prior, noise and fitted statistics: tensors and plain values, no model."""
        return persistence.state_dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; it must match this Laplace's options and model.

        Raises:
            ValueError: For a state of other options, another subset or model shapes.
        """
        persistence.load_state_dict(self, state)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (never a half-written file)."""
        persistence.save(self.state_dict(), path)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], model: nn.Module, *, map_location: Any = None
    ) -> Laplace:
        """Build a Laplace for ``model`` from a file written by :meth:`save`.

        Args:
            path: The file.
            model: The model the state was fitted on (same parameter names and shapes).
            map_location: As in ``torch.load``, e.g. ``"cpu"``.
        """
        state = persistence.load(path, map_location)
        options = dict(state["options"])
        fit = state["fit"]
        subset: SubsetSpec = "all"
        if fit is not None:
            subset = "last_layer" if fit["last_layer"] is not None else list(fit["names"])
        la = cls(model, options.pop("likelihood"), subset=subset, **options)
        la.load_state_dict(state)
        return la

    # ---------------------------------------------------------------- fit
    def fit(
        self,
        train_loader: Iterable[Any],
        *,
        progress: bool = False,
        generator: torch.Generator | None = None,
        group: distributed.Group = None,
        reduce: bool = True,
        x_key: str | None = None,
        y_key: str | None = None,
    ) -> Laplace:
        """Accumulate the curvature over the data, replacing any earlier fit.

        The model runs in eval mode during the fit (each module's mode is restored after).
        If anything fails, the object is left exactly as it was. When a
        ``torch.distributed`` process group is initialised, each rank fits the batches its
        loader yields (e.g. with a ``DistributedSampler``) and the sums are all-reduced, so
        every rank ends with the posterior of the whole data; a failure on one rank raises
        on every rank.

        Args:
            train_loader: Iterable of ``(inputs, targets)`` batches (a DataLoader, also over
                an IterableDataset without ``len``, or any generator), or of mappings.
            progress: Show a progress bar (on rank 0).
            generator: Random generator for ``curvature="fisher"``, on the model's device.
            group: Process group to reduce over; the default group if None.
            reduce: Sum the statistics across ranks when a process group is initialised;
                False fits this rank's data alone (and runs no collective).
            x_key: For mapping batches, the key of the inputs (without it the model gets
                the mapping less ``y_key``).
            y_key: For mapping batches, the key of the targets.

        Returns:
            ``self``.

        Raises:
            ValueError: For an empty loader, outputs that are NaN or infinite, targets out
                of range, or a subset that selects nothing trainable.
            TypeError: For batches that are not ``(inputs, targets)`` pairs, or targets of the
                wrong dtype.
        """
        with eval_mode(self.model):
            self._fit = run_fit(
                self,
                train_loader,
                progress,
                generator,
                group=group,
                reduce=reduce,
                x_key=x_key,
                y_key=y_key,
            )
            self._eigens = None
            self._stale = False
        return self

    def _engine(self, selection: Selection) -> CurvatureEngine:
        if self.structure is Structure.FULL and selection.n_params > self.max_full_params:
            alternatives = "structure='kron' or 'diag'"
            if self.subset != "last_layer":
                alternatives += ", or subset='last_layer'"
            raise ValueError(
                f"structure='full' over {selection.n_params} parameters would need a "
                f"{selection.n_params}² matrix (limit max_full_params={self.max_full_params}); "
                f"use {alternatives}."
            )
        layout_of(selection, self.structure).prior_structure(self._prior_precision)
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
