"""The in-process predictor a service embeds: batched, thread-safe, plain results per input."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from laplacefim import checks
from laplacefim._version import __version__
from laplacefim.fitting import model_device
from laplacefim.inputs import ModelIO, batch_size, split_rows
from laplacefim.likelihoods import LikelihoodModel, make_likelihood
from laplacefim.serving.abstention import AbstentionRule
from laplacefim.serving.scores import (
    OOD_SCORE,
    BatchScores,
    map_scores,
    posterior_scores,
    scores_of,
    shared_normals,
)

if TYPE_CHECKING:
    from laplacefim.laplace import Laplace


class InputError(ValueError):
    """Inputs that cannot be predicted on; the message says which and why."""


@dataclass(frozen=True)
class InputResult:
    """The answer for one input: plain Python values, ready for JSON.

    Attributes:
        prediction: The predicted class, or the predictive mean (one value per output).
        probabilities: Class probabilities (binary: ``[P(y=0), P(y=1)]``); None for
            regression.
        variance: For regression, ``{"epistemic", "aleatoric", "total"}`` per output.
        uncertainty: The task's scores by name (``max_probability``, ``entropy``,
            ``mutual_information``; or ``total_variance``, ``epistemic_variance``).
        ood_score: Higher means less like the training data (the mutual information, or the
            summed epistemic variance).
        abstain: Whether the abstention rule declines to answer; None without a rule.
    """

    prediction: int | list[float]
    probabilities: list[float] | None
    variance: dict[str, list[float]] | None
    uncertainty: dict[str, float]
    ood_score: float
    abstain: bool | None

    def to_dict(self) -> dict[str, Any]:
        """The fields that apply, as a dict."""
        out: dict[str, Any] = {"prediction": self.prediction}
        if self.probabilities is not None:
            out["probabilities"] = self.probabilities
        if self.variance is not None:
            out["variance"] = self.variance
        out["uncertainty"] = self.uncertainty
        out["ood_score"] = self.ood_score
        out["abstain"] = self.abstain
        return out


class Predictor:
    """Predictions with uncertainty and an abstention flag, one plain result per input.

    With a fitted :class:`~laplacefim.Laplace` the predictive is its GLM probit predictive;
    without one (``la=None``) the MAP network's, with zero epistemic uncertainty (a
    baseline to serve beside it). Calls are serialised by a lock (the posterior's
    predictive hooks the model), so one predictor may be shared by threads; inputs are
    processed ``batch_size`` at a time.

    Args:
        model: The model; with ``la``, the model it was fitted on.
        la: The fitted posterior, or None for the MAP network alone.
        batch_size: Inputs per model call.
        abstain: The abstention rule; by default the one calibrated on ``la``
            (:meth:`~laplacefim.Laplace.calibrate_abstention`), else none (``abstain`` is
            then None in every result).
        likelihood: Without ``la``: the likelihood's name or instance.
        io: Without ``la``: how the model takes mapping inputs (:class:`ModelIO`).

    Raises:
        ValueError: For a ``la`` fitted on another model, or no likelihood without ``la``.

    Example:
        >>> predictor = Predictor(model, la, batch_size=64)
        >>> predictor.predict(x_test)[0].to_dict()["probabilities"]
    """

    def __init__(
        self,
        model: nn.Module,
        la: Laplace | None = None,
        *,
        batch_size: int = 64,
        abstain: AbstentionRule | str | None = "auto",
        likelihood: str | LikelihoodModel | None = None,
        io: ModelIO | None = None,
    ) -> None:
        if la is not None:
            if la.model is not model:
                raise ValueError("la was fitted on another model; pass the model it wraps.")
            la.n_params  # raises before a fit, or when the weights changed  # noqa: B018
            self.likelihood = la.config.likelihood
            self.io = la.config.io
        else:
            if likelihood is None:
                raise ValueError("without la, pass likelihood= (e.g. 'classification').")
            self.likelihood = make_likelihood(likelihood)
            self.io = io or ModelIO()
        if abstain != "auto" and abstain is not None and not isinstance(abstain, AbstentionRule):
            raise TypeError(f"abstain must be an AbstentionRule, None or 'auto', got {abstain!r}.")
        allowed = [score.value for score in scores_of(self.likelihood.task)]
        if isinstance(abstain, AbstentionRule) and abstain.score not in allowed:
            raise ValueError(
                f"the abstention rule reads {abstain.score!r}, which a {self.likelihood.task} "
                f"model does not have; expected one of {allowed}."
            )
        self.model = model
        self.la = la
        self.batch_size = checks.integer(batch_size, "batch_size")
        self._abstain = abstain
        self.device = model_device(model)
        self.dtype = next(
            (p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32
        )
        self._lock = threading.Lock()

    @property
    def rule(self) -> AbstentionRule | None:
        """The abstention rule in force: with ``abstain="auto"``, the posterior's current
        one (so a refit or a new prior, which drops it, is followed)."""
        if self._abstain == "auto":
            return None if self.la is None else self.la.abstention
        return self._abstain  # type: ignore[return-value]

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``."""
        return self.likelihood.task

    # ---------------------------------------------------------------- inputs
    def prepare(self, entries: Sequence[Any]) -> object:
        """Batched inputs on the model's device from one entry per input.

        An entry is a nested list of numbers (the input without the batch dimension), or,
        for models that take mappings, a mapping of such lists. Numbers become the model's
        floating dtype; in mappings, lists of integers stay integers (token ids, masks).

        Raises:
            InputError: For no entries, entries of different shapes or keys, values that
                are not numbers, non-finite numbers, or a shape unlike the training inputs.
        """
        if len(entries) == 0:
            raise InputError("inputs is empty; send at least one input.")
        if all(isinstance(e, Mapping) for e in entries):
            keys = list(entries[0])
            for index, entry in enumerate(entries):
                if set(entry) != set(keys):
                    raise InputError(
                        f"input {index} has keys {sorted(entry)} but input 0 has {sorted(keys)}; "
                        "every input needs the same keys."
                    )
            return {key: self._tensor([e[key] for e in entries], key, floats=False) for key in keys}
        if any(isinstance(e, Mapping) for e in entries):
            raise InputError("mix of mappings and arrays in inputs; send one kind.")
        x = self._tensor(list(entries), "inputs", floats=True)
        shape = self._input_shape()
        if shape is not None and tuple(x.shape[1:]) != shape:
            raise InputError(f"each input must have shape {list(shape)}, got {list(x.shape[1:])}.")
        return x

    def _input_shape(self) -> tuple[int, ...] | None:
        return None if self.la is None else self.la.input_shape

    def _tensor(self, values: list[Any], name: str, *, floats: bool) -> Tensor:
        try:
            x = torch.tensor(values)
        except (TypeError, ValueError, RuntimeError) as error:
            reason = str(error).splitlines()[0]
            raise InputError(
                f"{name}: every input must be a nested list of numbers of one shape ({reason})."
            ) from None
        if x.dtype == torch.bool and floats:
            raise InputError(f"{name}: expected numbers, got booleans.")
        if x.dtype.is_floating_point or floats:
            x = torch.tensor(values, dtype=self.dtype)  # from the numbers, not via float32
            bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1) if x.ndim else ~torch.isfinite(x)
            if bool(bad.any()):
                rows = torch.nonzero(bad.reshape(-1)).reshape(-1).tolist()[:10]
                raise InputError(f"{name}: NaN or infinite values in input(s) {rows}.")
        return x.to(self.device)

    # ---------------------------------------------------------------- prediction
    def score(self, x: object) -> BatchScores:
        """Predictions and scores of batched inputs, ``batch_size`` at a time (tensors)."""
        if batch_size(x) == 0:
            raise InputError("no inputs: the batch is empty.")
        parts = []
        with self._lock:
            for chunk in split_rows(x, self.batch_size):
                parts.append(self._score_chunk(chunk))
        return BatchScores(
            prediction=torch.cat([p.prediction for p in parts]),
            probabilities=_cat([p.probabilities for p in parts]),
            epistemic_var=_cat([p.epistemic_var for p in parts]),
            aleatoric_var=_cat([p.aleatoric_var for p in parts]),
            scores={k: torch.cat([p.scores[k] for p in parts]) for k in parts[0].scores},
            ood_score=torch.cat([p.ood_score for p in parts]),
        )

    def _score_chunk(self, x: object) -> BatchScores:
        if self.la is not None:
            scored = posterior_scores(self.la, x, shared_normals)
        else:
            scored = map_scores(self.model, self.likelihood, self.io, x, shared_normals)
        if scored.prediction.ndim != (1 if self.task == "classification" else 2):
            raise ValueError(
                "the model gives one prediction per token (outputs "
                f"{tuple(scored.prediction.shape)}); the predictor serves one per input."
            )
        return scored

    def predict(self, x: object) -> list[InputResult]:
        """One result per input.

        Args:
            x: Batched inputs ``(B, ...)`` on the model's device, or a mapping of them, or
                a list of per-input entries (see :meth:`prepare`).

        Returns:
            ``B`` :class:`InputResult`.
        """
        if isinstance(x, list | tuple):
            x = self.prepare(x)
        return self.results(self.score(x))

    def results(self, scored: BatchScores) -> list[InputResult]:
        """Per-input plain results from a batch's scores."""
        rule = self.rule
        abstain = None if rule is None else rule.abstains(scored.scores).tolist()
        scores = {k: v.tolist() for k, v in scored.scores.items()}
        ood = scored.ood_score.tolist()
        prediction = scored.prediction.tolist()
        probs = None if scored.probabilities is None else scored.probabilities.tolist()
        variance = None
        if scored.epistemic_var is not None:
            epistemic = scored.epistemic_var
            aleatoric = (
                torch.zeros_like(epistemic)
                if scored.aleatoric_var is None
                else scored.aleatoric_var
            )
            variance = {
                "epistemic": epistemic.tolist(),
                "aleatoric": aleatoric.tolist(),
                "total": (epistemic + aleatoric).tolist(),
            }
        out = []
        for i in range(len(prediction)):
            out.append(
                InputResult(
                    prediction=prediction[i],
                    probabilities=None if probs is None else probs[i],
                    variance=None if variance is None else {k: v[i] for k, v in variance.items()},
                    uncertainty={k: v[i] for k, v in scores.items()},
                    ood_score=ood[i],
                    abstain=None if abstain is None else bool(abstain[i]),
                )
            )
        return out

    # ---------------------------------------------------------------- description
    def metadata(self) -> dict[str, Any]:
        """What is served: likelihood, posterior options, prior, abstention rule, version."""
        la = self.la
        out: dict[str, Any] = {
            "package": "laplacefim",
            "version": __version__,
            "likelihood": self.likelihood.name,
            "task": self.task,
            "posterior": None,
            "ood_score": OOD_SCORE[self.task].value,
            "abstention": None if self.rule is None else self.rule.to_state(),  # in force
            "batch_size": self.batch_size,
            "input_shape": None,
        }
        if la is not None:
            prior = la.prior_precision.detach().cpu()
            shape = self._input_shape()
            out["input_shape"] = None if shape is None else list(shape)
            out["posterior"] = {
                "structure": la.structure,
                "subset": la.subset if isinstance(la.subset, str) else list(la.parameter_names),
                "curvature": la.curvature_kind.value,
                "prior_precision": prior.item() if prior.ndim == 0 else prior.tolist(),
                "sigma_noise": _plain(la.sigma_noise),
                "temperature": la.temperature,
                "n_params": la.n_params,
                "n_data": la.n_data,
                "last_layer": la.last_layer,
            }
        return out


def _cat(parts: list[Tensor | None]) -> Tensor | None:
    return None if parts[0] is None else torch.cat(parts)  # type: ignore[arg-type]


def _plain(value: Tensor) -> float | list[float]:
    value = value.detach().cpu()
    return float(value) if value.ndim == 0 else value.tolist()


__all__ = ["InputError", "InputResult", "Predictor"]
