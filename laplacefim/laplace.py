"""The ``Laplace`` front door: a thin façade over a configuration, hyperparameters and a
fitted state (:mod:`laplacefim.config`), with fitting, tuning, prediction, persistence and
fine-tuning done by functions of those values."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor, nn

from laplacefim import checks, distributed, persistence, posterior, tuning
from laplacefim.config import MAX_FULL_PARAMS, CurvatureConfig, FitState, Hyperparameters
from laplacefim.distributions import posterior_distribution
from laplacefim.finetune import finetune
from laplacefim.fitting import eval_mode, fit_curvature, make_engine
from laplacefim.inputs import ModelIO, OutputSpec
from laplacefim.layout import Layout
from laplacefim.likelihoods import LikelihoodModel, make_likelihood
from laplacefim.marglik import PriorTuning
from laplacefim.options import (
    CurvatureKind,
    KfacApprox,
    Link,
    PredictMethod,
    PriorStructure,
    TuneMethod,
    parse_option,
)
from laplacefim.posterior import PosteriorPrecision
from laplacefim.prediction import Prediction
from laplacefim.predictive import glm_moments, linearised_samples, sampled_outputs
from laplacefim.structures import BlockDiagonal, StructureSpec, make_structure
from laplacefim.structures.base import Decomposition, Precision
from laplacefim.subsets import SubsetSpec, select, validate_subset

WEIGHTS_CHECKS = ("raise", "warn", "off")


class Laplace:
    """A Laplace approximation ``N(θ*, (F / T + P₀)⁻¹)`` around a trained model.

    ``F`` is a curvature of the summed negative log-likelihood over the training data: the
    exact generalised Gauss-Newton matrix (equal to the Fisher information for these
    likelihoods), a Monte-Carlo Fisher, or the empirical Fisher; ``T`` is the temperature
    and ``P₀`` the (diagonal) prior precision.

    Args:
        model: The trained model. Its parameters with ``requires_grad=False`` are never
            part of the posterior.
        likelihood: A registered name — ``"classification"`` (logits ``(B, C)``),
            ``"regression"`` (Gaussian noise, outputs ``(B, K)``), ``"binary"`` (one logit),
            ``"heteroscedastic"`` (mean and log-variance ``(B, 2K)``) — or an instance.
        subset: ``"all"``, ``"last_layer"`` (the last ``nn.Linear`` executed, found during
            fit), a list of parameter names, or a callable ``(name, param) -> bool``.
        structure: A registered name — ``"kron"`` (KFAC; parameters without a Kronecker
            rule get their exact diagonal), ``"diag"``, ``"full"``, ``"ekfac"``,
            ``"lowrank"`` — or an instance (e.g. ``LowRank(rank=30)``).
        curvature: ``"ggn"``, ``"fisher"`` (Monte-Carlo labels) or ``"empirical_fisher"``.
        prior_precision: Prior precision, a float or a tensor ``(P,)``; ``>= 0``.
        sigma_noise: Observation noise for regression, a float or one value per output.
        temperature: Posterior temperature; the curvature is divided by it.
        fisher_samples: Labels drawn per datum for ``curvature="fisher"``.
        accumulate_dtype: Dtype in which statistics are formed and summed (for example
            ``torch.float64``); the parameters' dtype by default.
        max_full_params: Largest number of parameters accepted with ``structure="full"``.
        kfac_approx: ``"expand"`` or ``"reduce"``: the Kronecker flavour for weights shared
            over positions (sequences, patches).
        x_key: For mapping batches and inputs, the key of the inputs.
        y_key: For mapping batches, the key of the targets.
        call_kwargs: Call ``model(**inputs)`` for mapping inputs (HuggingFace style).
        output_key: Picks the output tensor from a tuple, mapping or output object the
            model returns: a key, an index or an attribute name (e.g. ``"logits"``).
        output_fn: Picks it with a callable instead.
        weights_check: What happens when the model's weights no longer equal the fitted
            mean: ``"raise"`` (default), ``"warn"`` or ``"off"``.

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
        likelihood: str | LikelihoodModel = "classification",
        *,
        subset: SubsetSpec = "all",
        structure: str | StructureSpec = "kron",
        curvature: str | CurvatureKind = "ggn",
        prior_precision: float | Tensor = 1.0,
        sigma_noise: float | Tensor = 1.0,
        temperature: float = 1.0,
        fisher_samples: int = 1,
        accumulate_dtype: torch.dtype | None = None,
        max_full_params: int = MAX_FULL_PARAMS,
        kfac_approx: str | KfacApprox = "expand",
        x_key: str | None = None,
        y_key: str | None = None,
        call_kwargs: bool = False,
        output_key: str | int | None = None,
        output_fn: Any = None,
        weights_check: str = "raise",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if output_key is not None and output_fn is not None:
            raise ValueError("give output_key= or output_fn=, not both.")
        if weights_check not in WEIGHTS_CHECKS:
            raise ValueError(
                f"weights_check={weights_check!r} is not valid; expected one of "
                f"{list(WEIGHTS_CHECKS)}."
            )
        output: OutputSpec = output_fn if output_fn is not None else output_key
        self.model = model
        self.config = CurvatureConfig(
            make_likelihood(likelihood),
            make_structure(structure),
            parse_option(curvature, CurvatureKind, "curvature"),
            validate_subset(subset),
            checks.integer(fisher_samples, "fisher_samples"),
            checks.floating_dtype(accumulate_dtype, "accumulate_dtype"),
            parse_option(kfac_approx, KfacApprox, "kfac_approx"),
            checks.integer(max_full_params, "max_full_params"),
            ModelIO(x_key, y_key, bool(call_kwargs), output),
        )
        self.weights_check = weights_check
        self._fit: FitState | None = None
        self._stale = False
        self._versions: tuple[int, ...] = ()
        self._decompositions: list[Decomposition] | None = None
        sigma = checks.hyperparameter(sigma_noise, "sigma_noise", allow_zero=False)
        self._check_noise(sigma)
        self._hyper = Hyperparameters(
            self._checked_prior(prior_precision),
            sigma,
            checks.number(temperature, "temperature", positive=True),
        )

    # ---------------------------------------------------------------- options
    @property
    def likelihood(self) -> str:
        """The likelihood's name."""
        return self.config.likelihood.name

    @property
    def structure(self) -> str:
        """The structure's name."""
        return self.config.structure.name

    @property
    def curvature_kind(self) -> CurvatureKind:
        """The curvature kind."""
        return self.config.kind

    @property
    def subset(self) -> SubsetSpec:
        """The subset option."""
        return self.config.subset

    @property
    def fisher_samples(self) -> int:
        """Labels drawn per datum for the MC Fisher."""
        return self.config.fisher_samples

    @property
    def temperature(self) -> float:
        """The posterior temperature."""
        return self._hyper.temperature

    def _checked_prior(self, value: float | Tensor) -> Tensor:
        prior = checks.hyperparameter(value, "prior_precision", allow_zero=True)
        if prior.ndim > 1:
            raise ValueError(
                "prior_precision must be a scalar, one value per layer (L,) or per parameter "
                f"(P,), got shape {tuple(prior.shape)}."
            )
        if self._fit is not None:
            self._fit.layout.prior_structure(prior)
        return prior

    @property
    def prior_precision(self) -> Tensor:
        """Prior precision: 0-d, one value per layer ``(L,)`` or per parameter ``(P,)``."""
        return self._hyper.prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        self._hyper = replace(self._hyper, prior_precision=self._checked_prior(value))

    def _check_noise(self, sigma: Tensor) -> None:
        self.config.likelihood.check_noise(sigma)
        if sigma.ndim > 1:
            raise ValueError(
                f"sigma_noise must be a scalar or (K,), got shape {tuple(sigma.shape)}."
            )
        if self._fit is not None:  # raises if the fitted curvature cannot follow this noise
            posterior.curvature_scale(self.config, self._hyper, self._fit, sigma)

    @property
    def sigma_noise(self) -> Tensor:
        """Observation noise of the regression likelihood: 0-d or one per output ``(K,)``."""
        return self._hyper.sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        sigma = checks.hyperparameter(value, "sigma_noise", allow_zero=False)
        self._check_noise(sigma)
        self._hyper = replace(self._hyper, sigma_noise=sigma)

    # ---------------------------------------------------------------- fitted state
    def _fitted(self) -> FitState:
        if self._stale:
            raise RuntimeError(
                "the model changed in finetune(refit=False), so this posterior is stale; "
                "call la.fit(train_loader) again."
            )
        if self._fit is None:
            raise RuntimeError("this Laplace has not been fitted; call la.fit(train_loader) first.")
        self._check_weights(self._fit)
        return self._fit

    def _check_weights(self, fit: FitState) -> None:
        """Compare the model's weights with the fitted mean when a version counter moved."""
        versions = tuple(p._version for p in fit.selection.params)
        if self.weights_check == "off" or versions == self._versions:
            return
        difference = float(persistence.weights_difference(fit))
        if difference == 0.0:
            self._versions = versions
            return
        message = (
            f"the model's weights changed since the fit (largest |θ - θ*| = {difference:.3g}): "
            "the posterior describes the old weights. Refit with la.fit(loader), restore the "
            "weights, or pass weights_check='warn' / 'off' to Laplace to use it anyway."
        )
        if self.weights_check == "raise":
            raise RuntimeError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        self._versions = versions

    def _set_fit(self, fit: FitState | None) -> None:
        self._fit = fit
        self._decompositions = None
        self._stale = False
        self._versions = () if fit is None else tuple(p._version for p in fit.selection.params)

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
        return posterior.log_likelihood(self.config, self._hyper, self._fitted(), self.sigma_noise)

    @property
    def curvature(self) -> BlockDiagonal:
        """The fitted curvature ``F`` (summed over data, before temperature and prior)."""
        return self._fitted().curvature

    @property
    def posterior_precision(self) -> PosteriorPrecision:
        """The posterior precision ``s·F + P₀`` in the fitted structure (``s = 1/T``, times
        the noise ratio when the regression noise changed after the fit)."""
        fit = self._fitted()
        dtype = fit.curvature.state()[0].dtype
        prior = self.prior_precision.to(device=fit.mean.device, dtype=dtype)
        scale = float(posterior.curvature_scale(self.config, self._hyper, fit, self.sigma_noise))
        return PosteriorPrecision(fit.curvature, scale, fit.layout.per_param(prior))

    def _decomposed(self) -> list[Decomposition]:
        if self._decompositions is None:
            self._decompositions = self._fitted().curvature.decompose()
        return self._decompositions

    def _precisions(self, hyper: Hyperparameters | None = None) -> list[Precision]:
        fit = self._fitted()
        return posterior.precisions(self.config, hyper or self._hyper, fit, self._decomposed())

    # ---------------------------------------------------------------- evidence
    def _hyper_value(self, value: float | Tensor | None, default: Tensor, name: str) -> Tensor:
        """A prior or noise value for the evidence: kept differentiable, checked > 0."""
        if value is None:
            value = default
        tensor = (
            value if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
        )
        tensor = tensor.to(device=self._fitted().mean.device, dtype=torch.float64)
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
        prior = self._hyper_value(prior_precision, self.prior_precision, "prior_precision")
        sigma = self._hyper_value(sigma_noise, self.sigma_noise, "sigma_noise")
        fit = self._fitted()
        return posterior.evidence(self.config, self._hyper, fit, self._decomposed())(prior, sigma)

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
        not with Kronecker structures), stopping when the relative change falls below
        ``tol``. ``method="gridsearch"`` picks the scalar prior in ``grid`` (default
        ``10⁻⁴ … 10⁴``, 21 values) with the lowest NLL of the GLM probit predictive on
        ``val_loader`` (batches as for ``fit``).

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
            ValueError: For an unknown option, a diagonal prior with a Kronecker structure,
                noise tuning with a per-output noise, or gridsearch without ``val_loader``.

        Example:
            >>> result = la.tune_prior()
            >>> result.prior_precision, result.n_iter
        """
        method = parse_option(method, TuneMethod, "method")
        structure = parse_option(prior_structure, PriorStructure, "prior_structure")
        fit = self._fitted()
        if method is TuneMethod.GRIDSEARCH:

            def predict(prior: Tensor, x: object) -> Prediction:
                return self._predict_glm(replace(self._hyper, prior_precision=prior), x)

            best, n_points = tuning.gridsearch(
                val_loader, grid, self.config, fit.mean.device, predict
            )
            self.prior_precision = best
            value = self.log_marginal_likelihood().detach()
            return PriorTuning(best, self.sigma_noise, value, n_points, True)
        evidence = posterior.evidence(self.config, self._hyper, fit, self._decomposed())
        prior, sigma, n_iter, converged = tuning.tune_evidence(
            evidence,
            fit.layout,
            self.config,
            self._hyper,
            structure,
            tune_noise=tune_noise,
            tol=tol,
            max_iter=max_iter,
        )
        self.prior_precision = prior
        if tune_noise and self.config.likelihood.has_noise:
            self.sigma_noise = sigma
        value = self.log_marginal_likelihood().detach()
        return PriorTuning(self.prior_precision, self.sigma_noise, value, n_iter, converged)

    # ---------------------------------------------------------------- posterior
    @property
    def posterior(self) -> TorchDistribution:
        """The posterior over the flat chosen parameters as a pyro distribution.

        Diagonal structures give ``Normal(...).to_event(1)``, one dense block a
        ``MultivariateNormal``, others a :class:`BlockDiagonalNormal`.
        """
        return posterior_distribution(self._fitted().mean, self._precisions())

    def sample(self, n_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Weight samples from the posterior, ``(n_samples, P)``.

        Args:
            n_samples: Number of samples.
            generator: Random generator on the model's device.
        """
        fit = self._fitted()
        blocks = self._precisions()
        z = torch.randn(
            (checks.integer(n_samples, "n_samples"), fit.mean.numel()),
            dtype=fit.mean.dtype,
            device=fit.mean.device,
            generator=generator,
        )
        parts = z.split([block.numel for block in blocks], dim=1)
        return fit.mean + torch.cat(
            [block.sample(part) for block, part in zip(blocks, parts, strict=True)], dim=1
        )

    def _inputs(self, x: object) -> object:
        fit = self._fitted()
        device = fit.mean.device
        tensors = (
            [x] if isinstance(x, Tensor) else list(x.values()) if isinstance(x, Mapping) else None
        )
        if tensors is None:
            raise TypeError(
                f"inputs must be a tensor or a mapping of tensors, got {type(x).__name__}."
            )
        for value in tensors:
            if isinstance(value, Tensor) and value.device != device:
                raise ValueError(
                    f"inputs are on {value.device} but the model is on {device}; "
                    f"move them with x.to({str(device)!r})."
                )
        if (
            isinstance(x, Tensor)
            and fit.input_shape is not None
            and tuple(x.shape[1:]) != fit.input_shape
        ):
            raise ValueError(
                f"inputs of shape {tuple(x.shape)} do not match the training inputs "
                f"(B, {', '.join(map(str, fit.input_shape))})."
            )
        if (
            isinstance(x, Mapping)
            and self.config.io.x_key is not None
            and self.config.io.x_key in x
        ):
            return x[self.config.io.x_key]
        return x

    def _predict_glm(
        self,
        hyper: Hyperparameters,
        x: object,
        link: Link = Link.PROBIT,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        joint_outputs: bool = False,
        chunk_size: int = 256,
    ) -> Prediction:
        fit = self._fitted()
        with eval_mode(self.model):
            engine = make_engine(self.model, self.config, fit.selection, hyper.sigma_noise)
            mean, cov = glm_moments(engine, fit.curvature, self._precisions(hyper), x, chunk_size)
        return self.config.likelihood.predictive(
            mean,
            cov,
            link=link,
            noise=hyper.sigma_noise,
            n_samples=n_samples,
            generator=generator,
            joint_outputs=joint_outputs,
        )

    def predict(
        self,
        x: object,
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
        with covariance ``J Σ Jᵀ``, computed per block from captured inputs and output
        gradients (no Jacobian except for a dense posterior), and ``link`` turns it into
        probabilities: ``"probit"`` (closed-form approximation), ``"mc"`` (``n_samples``
        logit samples), ``"bridge"`` (Laplace bridge to a Dirichlet).
        ``method="nn"`` samples ``n_samples`` weight vectors and runs the network.

        Args:
            x: Inputs ``(B, ...)`` on the model's device, shaped like the training inputs,
                or a mapping of them (as the model takes them).
            method: ``"glm"`` or ``"nn"``.
            link: ``"probit"``, ``"mc"`` or ``"bridge"`` (classification, GLM only).
            n_samples: Samples for ``link="mc"`` and ``method="nn"``.
            generator: Random generator on the model's device.
            joint_outputs: Also return the output covariance ``(B, C, C)``.
            chunk_size: Inputs processed at a time (bounds the memory).

        Returns:
            A :class:`Prediction`.

        Raises:
            RuntimeError: Before ``fit``, or when the model's weights changed since.
            ValueError: For inputs on another device or of another shape than the training
                inputs, unknown options, or a singular posterior precision.

        Example:
            >>> probs = la.predict(x_test).probs
        """
        method = parse_option(method, PredictMethod, "method")
        link = parse_option(link, Link, "link")
        fit = self._fitted()
        x = self._inputs(x)
        if method is PredictMethod.GLM:
            return self._predict_glm(
                self._hyper, x, link, n_samples, generator, joint_outputs, chunk_size
            )
        with eval_mode(self.model):
            weights = self.sample(n_samples, generator=generator)
            outputs = sampled_outputs(
                self.model, self.config.io, fit.selection.params, weights, x, chunk_size=chunk_size
            )
        return self.config.likelihood.sampled_predictive(
            outputs.to(fit.mean.dtype), noise=self.sigma_noise, joint_outputs=joint_outputs
        )

    def __call__(self, x: object, **options: Any) -> Prediction:
        """Shorthand for :meth:`predict`."""
        return self.predict(x, **options)

    def predictive_samples(
        self,
        x: object,
        n_samples: int,
        *,
        generator: torch.Generator | None = None,
        chunk_size: int = 256,
    ) -> Tensor:
        """Function samples of the linearised model, ``(S, B, C)`` (or ``(S, B, K)``).

        Each sample uses one weight draw for all inputs, so samples are jointly correct:
        their covariance across inputs is the GLM's ``J(x) Σ J(x')ᵀ``.

        Args:
            x: Inputs ``(B, ...)``, or a mapping of them.
            n_samples: Number of function samples ``S``.
            generator: Random generator on the model's device.
            chunk_size: Inputs processed at a time.
        """
        fit = self._fitted()
        x = self._inputs(x)
        deltas = self.sample(n_samples, generator=generator) - fit.mean
        with eval_mode(self.model):
            return linearised_samples(
                self.model, self.config.io, fit.selection.names, deltas, x, chunk_size=chunk_size
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
            train_loader: Batches as for :meth:`fit`.
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
        finetune(
            self.model,
            self.config,
            self._hyper,
            fit,
            train_loader,
            epochs=epochs,
            lr=lr,
            generator=generator,
            options=options,
        )
        if refit:
            self.fit(train_loader, generator=generator)
        else:
            self._stale = True
        return self

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """Options, prior, noise and fitted statistics: tensors and plain values, no model."""
        return persistence.state_dict(self.config, self._hyper, self._fit)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; it must match this Laplace's options and model.

        Raises:
            ValueError: For a state of other options, another subset or model shapes.
        """
        hyper, fit = persistence.restore(self.model, self.config, self._hyper, state)
        options = state["options"]
        config = replace(self.config, fisher_samples=int(options["fisher_samples"]))
        self._check_noise_for(fit, hyper, config)
        self.config = config
        self._hyper = hyper
        self._set_fit(fit)

    def _check_noise_for(
        self, fit: FitState | None, hyper: Hyperparameters, config: CurvatureConfig
    ) -> None:
        config.likelihood.check_noise(hyper.sigma_noise)
        if fit is not None:
            posterior.curvature_scale(config, hyper, fit, hyper.sigma_noise)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (never a half-written file)."""
        persistence.save(self.state_dict(), path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module,
        *,
        map_location: Any = None,
        strict: bool = True,
        **io: Any,
    ) -> Laplace:
        """Build a Laplace for ``model`` from a file written by :meth:`save`.

        Args:
            path: The file.
            model: The model the state was fitted on: same parameter names and shapes,
                and — with ``strict`` — the weights the posterior was fitted at.
            map_location: As in ``torch.load``, e.g. ``"cpu"``.
            strict: Refuse a model whose weights differ from the saved mean.
            **io: ``x_key``, ``y_key``, ``call_kwargs``, ``output_key``, ``output_fn``,
                ``weights_check``, as for the constructor.

        Raises:
            ValueError: For a file of another format, a model of other names or shapes,
                or (``strict``) other weights.
        """
        state = persistence.load(path, map_location)
        options = dict(state["options"])
        fit = state["fit"]
        subset: SubsetSpec = "all"
        if fit is not None:
            subset = "last_layer" if fit["last_layer"] is not None else list(fit["names"])
        la = cls(
            model,
            make_likelihood(options["likelihood"], options["likelihood_options"]),
            subset=subset,
            structure=make_structure(options["structure"], options["structure_options"]),
            curvature=options["curvature"],
            fisher_samples=options["fisher_samples"],
            kfac_approx=options["kfac_approx"],
            **io,
        )
        la.load_state_dict(state)
        if la._fit is not None and strict:
            difference = float(persistence.weights_difference(la._fit))
            tolerance = 8 * torch.finfo(la._fit.mean.dtype).eps * float(la._fit.mean.abs().max())
            if difference > tolerance:
                raise ValueError(
                    f"the model's weights differ from the fitted mean saved in {str(path)!r} "
                    f"(largest |θ - θ*| = {difference:.3g}); load the weights the posterior was "
                    "fitted at into the model first, or pass strict=False (and "
                    "weights_check='off') to use it anyway."
                )
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
        If anything fails, the object is left exactly as it was. On the first batch, the
        engine checks that it accounts for every chosen parameter exactly and raises,
        naming the parameters, where it cannot. When a ``torch.distributed`` process group
        is initialised, each rank fits the batches its loader yields (e.g. with a
        ``DistributedSampler``) and the sums are all-reduced, so every rank ends with the
        posterior of the whole data; a failure on one rank raises on every rank.

        Args:
            train_loader: Iterable of ``(inputs, targets)`` batches (a DataLoader, also over
                an IterableDataset without ``len``, or any generator), or of mappings.
                Structures that pass over the data more than once (``"ekfac"``,
                ``"lowrank"``) need a re-iterable loader.
            progress: Show a progress bar (on rank 0).
            generator: Random generator for ``curvature="fisher"``, on the model's device.
            group: Process group to reduce over; the default group if None.
            reduce: Sum the statistics across ranks when a process group is initialised;
                False fits this rank's data alone (and runs no collective).
            x_key: For mapping batches, the key of the inputs (without it the model gets
                the mapping less ``y_key``); kept for later calls.
            y_key: For mapping batches, the key of the targets; kept for later calls.

        Returns:
            ``self``.

        Raises:
            ValueError: For an empty loader, outputs that are NaN or infinite, targets out
                of range, a subset that selects nothing trainable, or parameters the engine
                cannot account for exactly.
            TypeError: For batches that are not ``(inputs, targets)`` pairs, or targets of the
                wrong dtype.
        """
        config = self.config
        if x_key is not None or y_key is not None:
            io = replace(
                config.io,
                x_key=x_key if x_key is not None else config.io.x_key,
                y_key=y_key if y_key is not None else config.io.y_key,
            )
            config = replace(config, io=io)
        if self.config.subset != "last_layer":
            Layout.of(select(self.model, config.subset)).prior_structure(self.prior_precision)
        fit = fit_curvature(
            self.model,
            config,
            self.sigma_noise,
            train_loader,
            progress=progress,
            generator=generator,
            group=group,
            reduce=reduce,
        )
        fit.layout.prior_structure(self.prior_precision)
        self.config = config
        self._set_fit(fit)
        return self

    def __repr__(self) -> str:
        fitted = (
            f"n_params={self._fit.selection.n_params}, n_data={self._fit.n_data}"
            if self._fit is not None
            else "not fitted"
        )
        return (
            f"Laplace(likelihood={self.likelihood!r}, subset={self.subset!r}, "
            f"structure={self.structure!r}, curvature={self.curvature_kind.value!r}, "
            f"{fitted})"
        )


__all__ = ["MAX_FULL_PARAMS", "Laplace"]
