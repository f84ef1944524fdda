"""The ``Laplace`` front door: a thin façade over a configuration, hyperparameters and a
fitted state (:mod:`laplacefim.config`), with fitting, tuning, prediction, persistence and
fine-tuning done by functions of those values."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from laplacefim import checks, distributed, persistence, posterior, tuning
from laplacefim.config import MAX_FULL_PARAMS, CurvatureConfig, FitState, Hyperparameters
from laplacefim.finetune import finetune
from laplacefim.fitted import FittedPosterior
from laplacefim.fitting import fit_curvature
from laplacefim.inputs import ModelIO, OutputSpec
from laplacefim.layout import Layout
from laplacefim.likelihoods import LikelihoodModel, make_likelihood
from laplacefim.marglik import PriorTuning
from laplacefim.options import (
    CurvatureKind,
    KfacApprox,
    PriorStructure,
    TuneMethod,
    parse_option,
)
from laplacefim.prediction import Prediction
from laplacefim.predictive import glm_prediction
from laplacefim.serving.abstention import AbstentionReport, AbstentionRule, calibrate
from laplacefim.serving.scores import Score, posterior_scores, shared_normals
from laplacefim.structures import StructureSpec, make_structure
from laplacefim.structures.base import Decomposition
from laplacefim.subsets import SubsetSpec, select, validate_subset

WEIGHTS_CHECKS = ("raise", "warn", "off")


class Laplace(FittedPosterior):
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
        pass_cache_mb: Structures that pass over the data more than once (``"ekfac"``,
            ``"lowrank"``) keep the first pass's layer inputs and output gradients up to
            this many megabytes and replay them instead of running the model again.

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
        pass_cache_mb: float = 256.0,
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
            checks.number(pass_cache_mb, "pass_cache_mb", non_negative=True),
        )
        self.weights_check = weights_check
        self._fit: FitState | None = None
        self._stale = False
        self._versions: tuple[int, ...] = ()
        self._decompositions: list[Decomposition] | None = None
        self.abstention: AbstentionRule | None = None
        sigma = checks.hyperparameter(sigma_noise, "sigma_noise", allow_zero=False)
        self._hyper = Hyperparameters(
            self._checked_prior(prior_precision),
            sigma,
            checks.number(temperature, "temperature", positive=True),
        )
        self._check_noise(sigma)

    # ---------------------------------------------------------------- options
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
        self.abstention = None  # calibrated for the predictive of the old prior

    def _check_noise(self, sigma: Tensor) -> None:
        posterior.check_noise(self.config, self._hyper, self._fit, sigma)

    @property
    def sigma_noise(self) -> Tensor:
        """Observation noise of the regression likelihood: 0-d or one per output ``(K,)``."""
        return self._hyper.sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        sigma = checks.hyperparameter(value, "sigma_noise", allow_zero=False)
        self._check_noise(sigma)
        self._hyper = replace(self._hyper, sigma_noise=sigma)
        self.abstention = None

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
        below ``tol``. A ``"diagonal"`` prior (one per parameter; not with Kronecker
        structures) starts from the layer-wise optimum and maximises the evidence plus a
        Gamma hyperprior with its mode there (MacKay's fixed point with κ = 1 pseudo-
        observation, stopping when the relative change falls below ``tol``), so that
        parameters the data do not determine keep their layer's prior scale.
        ``method="gridsearch"`` picks the scalar prior in ``grid`` (default ``10⁻⁴ … 10⁴``,
        21 values) with the lowest NLL of the GLM probit predictive on ``val_loader``
        (batches as for ``fit``).

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
                hyper = replace(self._hyper, prior_precision=prior)
                precisions = self._precisions(hyper)
                return glm_prediction(self._engine(fit), self.config, hyper, fit, precisions, x)

            best, n_points = tuning.gridsearch(
                val_loader, grid, self.config, fit.mean.device, predict
            )
            self.prior_precision = best
            value = self.log_marginal_likelihood().detach()
            return PriorTuning(best, self.sigma_noise.clone(), value, n_points, True)
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
        return PriorTuning(
            self.prior_precision.clone(), self.sigma_noise.clone(), value, n_iter, converged
        )

    # ---------------------------------------------------------------- abstention
    def calibrate_abstention(
        self,
        val_loader: Iterable[Any],
        *,
        target_coverage: float | None = None,
        target_risk: float | None = None,
        score: str | Score | None = None,
    ) -> AbstentionReport:
        """Choose when to abstain, on held-out data, and keep the rule with this posterior.

        The rule abstains on inputs whose uncertainty ``score`` is beyond a threshold,
        chosen so that a fraction ``target_coverage`` of the held-out inputs is answered, or
        so that the mean loss over the answered ones (error rate; squared error for
        regression) is at most ``target_risk`` with as many answered as possible. The rule
        is saved with :meth:`save`, used by :class:`~laplacefim.serving.Predictor`, and
        dropped when the fit, prior or noise changes (calibrate after tuning).

        Args:
            val_loader: Held-out batches, as for :meth:`fit` (not the training data).
            target_coverage: Fraction of inputs to answer, in ``(0, 1]``.
            target_risk: Largest selective risk, ``>= 0``.
            score: ``"max_probability"`` (default), ``"entropy"`` or
                ``"mutual_information"`` for classification; ``"total_variance"``
                (default) or ``"epistemic_variance"`` for regression.

        Returns:
            The rule and the risk–coverage curve (with its AURC) it was chosen from.

        Raises:
            ValueError: For both or neither target, a score that does not apply, or a risk
                no threshold reaches (the message gives the lowest).

        Example:
            >>> report = la.calibrate_abstention(val_loader, target_coverage=0.95)
            >>> report.rule.threshold, report.curve.aurc
        """
        fit = self._fitted()
        report = calibrate(
            self.config.likelihood.task,
            lambda x: posterior_scores(self, x, shared_normals),
            self.config.io,
            fit.mean.device,
            val_loader,
            score=score,
            target_coverage=target_coverage,
            target_risk=target_risk,
        )
        self.abstention = report.rule
        return report

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
        rule = None if self.abstention is None else self.abstention.to_state()
        return persistence.state_dict(self.config, self._hyper, self._fit, rule)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; it must match this Laplace's options and model.

        Raises:
            ValueError: For a state of other options, another subset or model shapes.
        """
        hyper, fit = persistence.restore(self.model, self.config, self._hyper, state)
        options = state["options"]
        config = replace(self.config, fisher_samples=int(options["fisher_samples"]))
        posterior.check_noise(config, hyper, fit, hyper.sigma_noise)
        self.config = config
        self._hyper = hyper
        self._set_fit(fit)
        rule = state.get("abstention")
        self.abstention = None if rule is None else AbstentionRule.from_state(rule)

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
        la = cls(model, **persistence.laplace_arguments(state), **io)
        la.load_state_dict(state)
        if la._fit is not None and strict:
            persistence.check_weights(la._fit, path)
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
        self.abstention = None  # calibrated for the predictive of the old fit
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
