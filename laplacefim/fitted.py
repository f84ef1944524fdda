"""The read side of a fitted Laplace: its posterior, evidence and predictions.

:class:`~laplacefim.Laplace` derives from :class:`FittedPosterior` and adds the write side
(options, fitting, tuning, persistence, fine-tuning). Everything here reads the values a fit
produced (:mod:`laplacefim.config`) and hands them to functions.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor, nn

from laplacefim import checks, persistence, posterior
from laplacefim.config import CurvatureConfig, FitState, Hyperparameters
from laplacefim.curvature import CurvatureEngine
from laplacefim.distributions import posterior_distribution
from laplacefim.fitting import eval_mode, make_engine
from laplacefim.options import CurvatureKind, Link, PredictMethod, parse_option
from laplacefim.posterior import PosteriorPrecision
from laplacefim.prediction import Prediction
from laplacefim.predictive import (
    check_inputs,
    glm_prediction,
    linearised_samples,
    sampled_outputs,
)
from laplacefim.structures import BlockDiagonal
from laplacefim.structures.base import Decomposition, Precision
from laplacefim.subsets import SubsetSpec


class FittedPosterior:
    """Queries of a fitted Laplace approximation (the base of :class:`~laplacefim.Laplace`).

    Attributes:
        model: The model.
        config: The curvature configuration.
        weights_check: ``"raise"``, ``"warn"`` or ``"off"`` when the model's weights no
            longer equal the fitted mean.
    """

    model: nn.Module
    config: CurvatureConfig
    weights_check: str
    _hyper: Hyperparameters
    _fit: FitState | None
    _stale: bool
    _versions: tuple[int, ...]
    _decompositions: list[Decomposition] | None
    # The current precisions and the prediction engine, with what they were made for.
    _precision_cache: (
        tuple[Hyperparameters, CurvatureConfig, tuple[int, int], list[Precision]] | None
    ) = None
    _engine_cache: tuple[FitState, CurvatureConfig, CurvatureEngine] | None = None

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
        self._precision_cache = None
        self._engine_cache = None
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
    def input_shape(self) -> tuple[int, ...] | None:
        """The shape of one training input (without the batch), None for mapping inputs."""
        return self._fitted().input_shape

    @property
    def mean(self) -> Tensor:
        """The posterior mean: the chosen parameters at fit time, flat ``(P,)``."""
        return self._fitted().mean

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """Names of the chosen parameters, in flat order."""
        return self._fitted().selection.names

    @property
    def parameter_priors(self) -> dict[str, Tensor]:
        """The prior precision of each chosen parameter tensor, shaped like the tensor."""
        fit = self._fitted()
        return fit.selection.unflatten(
            fit.layout.per_param(self._hyper.prior_precision.to(fit.mean))
        )

    @property
    def last_layer(self) -> str | None:
        """Name of the module found as the last layer (``subset="last_layer"`` only)."""
        return self._fitted().last_layer

    @property
    def log_likelihood(self) -> Tensor:
        """Log-likelihood of the training data at the mean, tempered: ``−Σ nll / T``."""
        return posterior.log_likelihood(
            self.config, self._hyper, self._fitted(), self._hyper.sigma_noise
        )

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
        prior = self._hyper.prior_precision.to(device=fit.mean.device, dtype=dtype)
        scale = float(
            posterior.curvature_scale(self.config, self._hyper, fit, self._hyper.sigma_noise)
        )
        return PosteriorPrecision(fit.curvature, scale, fit.layout.per_param(prior))

    @staticmethod
    def _dtype(fit: FitState) -> torch.dtype:
        """The dtype of samples and predictions: the parameters', at least the statistics'
        (float32 for half-precision models)."""
        return torch.promote_types(fit.mean.dtype, fit.curvature.state()[0].dtype)

    def _decomposed(self) -> list[Decomposition]:
        if self._decompositions is None:
            self._decompositions = self._fitted().curvature.decompose()
        return self._decompositions

    def _precisions(self, hyper: Hyperparameters | None = None) -> list[Precision]:
        """The blocks' precisions at ``hyper`` (the current ones, kept until they change)."""
        fit = self._fitted()
        if hyper is not None:
            return posterior.precisions(self.config, hyper, fit, self._decomposed())
        hyper = self._hyper
        key = (hyper.prior_precision._version, hyper.sigma_noise._version)  # in-place edits
        cached = self._precision_cache
        if (
            cached is None
            or cached[0] is not hyper
            or cached[1] is not self.config
            or (cached[2] != key)
        ):
            precisions = posterior.precisions(self.config, hyper, fit, self._decomposed())
            self._precision_cache = cached = (hyper, self.config, key, precisions)
        return cached[3]

    def _engine(self, fit: FitState) -> CurvatureEngine:
        """The engine that gives the Jacobian rows of predictions (kept for this fit)."""
        cached = self._engine_cache
        if cached is None or cached[0] is not fit or cached[1] is not self.config:
            engine = make_engine(self.model, self.config, fit.selection, self._hyper.sigma_noise)
            self._engine_cache = cached = (fit, self.config, engine)
        return cached[2]

    # ---------------------------------------------------------------- evidence
    def _hyper_value(self, value: float | Tensor | None, default: Tensor, name: str) -> Tensor:
        """A prior or noise value for the evidence: kept differentiable, checked > 0."""
        if value is None:
            value = default
        tensor = (
            value if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
        )
        tensor = tensor.to(device=self._fitted().mean.device, dtype=torch.float64)
        tensor = checks.scalar_if_single(tensor)  # kept differentiable
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
        prior = self._hyper_value(prior_precision, self._hyper.prior_precision, "prior_precision")
        sigma = self._hyper_value(sigma_noise, self._hyper.sigma_noise, "sigma_noise")
        fit = self._fitted()
        value = posterior.evidence(self.config, self._hyper, fit, self._decomposed())(prior, sigma)
        posterior.warn_rounding(fit, prior)
        return value

    # ---------------------------------------------------------------- posterior
    @property
    def posterior(self) -> TorchDistribution:
        """The posterior over the flat chosen parameters as a pyro distribution.

        Diagonal structures give ``Normal(...).to_event(1)``, one dense block a
        ``MultivariateNormal``, others a :class:`BlockDiagonalNormal`.
        """
        fit = self._fitted()
        return posterior_distribution(fit.mean.to(self._dtype(fit)), self._precisions())

    def sample(self, n_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Weight samples from the posterior, ``(n_samples, P)``.

        Args:
            n_samples: Number of samples.
            generator: Random generator on the model's device.
        """
        fit = self._fitted()
        blocks = self._precisions()
        dtype = self._dtype(fit)
        z = torch.randn(
            (checks.integer(n_samples, "n_samples"), fit.mean.numel()),
            dtype=dtype,
            device=fit.mean.device,
            generator=generator,
        )
        parts = z.split([block.numel for block in blocks], dim=1)
        return fit.mean.to(dtype) + torch.cat(
            [block.sample(part) for block, part in zip(blocks, parts, strict=True)], dim=1
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
                inputs, rows with NaN or infinite values (named), unknown options, or a
                singular posterior precision.

        Example:
            >>> probs = la.predict(x_test).probs
        """
        method = parse_option(method, PredictMethod, "method")
        link = parse_option(link, Link, "link")
        fit = self._fitted()
        x = check_inputs(x, fit, self.config.io)
        if method is PredictMethod.GLM:
            return glm_prediction(
                self._engine(fit),
                self.config,
                self._hyper,
                fit,
                self._precisions(),
                x,
                link=link,
                n_samples=n_samples,
                generator=generator,
                joint_outputs=joint_outputs,
                chunk_size=chunk_size,
            )
        with eval_mode(self.model):
            weights = self.sample(n_samples, generator=generator)
            raw = sampled_outputs(
                self.model, self.config.io, fit.selection.params, weights, x, chunk_size=chunk_size
            )
        likelihood = self.config.likelihood
        outputs = torch.stack([likelihood.outputs(sample) for sample in raw])
        return likelihood.sampled_predictive(
            outputs.to(self._dtype(fit)),
            noise=self._hyper.sigma_noise,
            joint_outputs=joint_outputs,
        )

    def export(
        self,
        path: str | os.PathLike[str],
        example_inputs: object,
        *,
        method: str | PredictMethod = "glm",
        n_samples: int = 32,
        generator: torch.Generator | None = None,
    ) -> None:
        """Write the predictive as a ``torch.export`` program that plain torch runs.

        Load it without laplacefim: ``torch.export.load(path).module()(x)`` returns a dict
        of tensors named as the fields of :class:`Prediction` (``probs``, ``logit_mean``,
        ``logit_var``, or ``mean``, ``epistemic_var``, ``aleatoric_var``, ``var``). The
        batch size is dynamic; other input dimensions are fixed to the example's.

        Args:
            path: The file to write (conventionally ``.pt2``), atomically.
            example_inputs: At least two inputs ``(B, ...)`` (or a mapping of them), on the
                model's device, to trace with.
            method: ``"glm"`` — the probit GLM predictive, equal to ``la.predict(x)``; only
                for posteriors whose parameters give the model's output (last layer).
                ``"nn"`` — the sampling predictive of ``n_samples`` weight draws fixed now,
                equal to ``la.predict(x, method="nn", n_samples=..., generator=g)`` for a
                generator ``g`` in the same state.
            n_samples: Weight draws kept for ``method="nn"``.
            generator: Random generator of the draws.

        Raises:
            ValueError: For ``method="glm"`` with parameters below the output layer, an
                example of fewer than two inputs, or inputs unlike the training inputs.

        Example:
            >>> la.export("predictive.pt2", x_test[:8])
            >>> torch.export.load("predictive.pt2").module()(x)["probs"]
        """
        from laplacefim.serving.export import GlmPredictive, SampledPredictive, export_program

        method = parse_option(method, PredictMethod, "method")
        fit = self._fitted()
        example = check_inputs(example_inputs, fit, self.config.io)
        module: nn.Module
        if method is PredictMethod.GLM:
            module = GlmPredictive(
                self.model, self.config, self._hyper, fit, self._precisions(), example
            )
        else:
            weights = self.sample(n_samples, generator=generator)
            module = SampledPredictive(
                self.model, self.config, self._hyper, fit, weights, self._dtype(fit)
            )
        export_program(module, example, path)

    def __call__(self, x: object, **options: Any) -> Prediction:
        """Shorthand for :meth:`predict`."""
        return self.predict(x, **options)

    def predictive_samples(
        self,
        x: object,
        n_samples: int,
        *,
        method: str | PredictMethod = "glm",
        generator: torch.Generator | None = None,
        chunk_size: int = 256,
    ) -> Tensor:
        """Function samples ``(S, B, C)`` (or ``(S, B, K)``) at weight draws from the posterior.

        ``method="glm"``: samples of the linearised model, ``f(x) + J(x) δₛ``;
        ``method="nn"``: the network's outputs with the chosen parameters set to each draw.
        Each sample uses one weight draw for all inputs, so samples are jointly correct
        (for ``"glm"`` their covariance across inputs is ``J(x) Σ J(x')ᵀ``).

        Args:
            x: Inputs ``(B, ...)``, or a mapping of them.
            n_samples: Number of function samples ``S``.
            method: ``"glm"`` or ``"nn"``.
            generator: Random generator on the model's device.
            chunk_size: Inputs processed at a time.
        """
        method = parse_option(method, PredictMethod, "method")
        fit = self._fitted()
        x = check_inputs(x, fit, self.config.io)
        weights = self.sample(n_samples, generator=generator)
        with eval_mode(self.model):
            if method is PredictMethod.GLM:
                raw = linearised_samples(
                    self.model,
                    self.config.io,
                    fit.selection.names,
                    weights - fit.mean,
                    x,
                    chunk_size=chunk_size,
                )
            else:
                raw = sampled_outputs(
                    self.model,
                    self.config.io,
                    fit.selection.params,
                    weights,
                    x,
                    chunk_size=chunk_size,
                )
        return torch.stack([self.config.likelihood.outputs(sample) for sample in raw])
