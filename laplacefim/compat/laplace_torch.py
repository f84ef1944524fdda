"""laplace-torch's public API on laplacefim's engine: change a script's import only.

``from laplacefim.compat.laplace_torch import Laplace, marglik_training`` accepts the calls
and options of laplace-torch 0.3 — ``Laplace(model, likelihood, subset_of_weights=...,
hessian_structure=...)``, ``fit``, ``optimize_prior_precision``, ``la(x, pred_type=...,
link_approx=...)``, ``log_marginal_likelihood``, ``sample``, ``predictive_samples``,
``state_dict`` / ``load_state_dict``, the ``prior_precision`` and ``sigma_noise``
attributes, and ``marglik_training`` — and returns what laplace-torch returns (class
probabilities; for regression ``(f_mu, f_var)`` with the *functional* covariance
``(B, K, K)``, the observation noise not added). Options with no counterpart here raise a
``ValueError`` that names them; ``docs/migrating.md`` maps every call both ways.

Differences that remain (documented there): ``optimize_prior_precision(method="marglik")``
finds the evidence's maximum by Newton's method instead of running ``n_steps`` Adam steps
(so it lands at the optimum rather than near it); a ``"diag"`` prior carries this
package's Gamma hyperprior; ``marglik_training``'s hyperparameter steps are Newton steps
as well (``lr_hyp`` is unused).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from laplacefim.laplace import Laplace as _Laplace
from laplacefim.training import train_marglik

_LIKELIHOODS = ("classification", "regression")
_SUBSETS = {"all": "all", "last_layer": "last_layer"}
_STRUCTURES = {"full": "full", "kron": "kron", "diag": "diag", "lowrank": "lowrank"}
_PRIORS = {"scalar": "scalar", "layerwise": "layerwise", "diag": "diagonal"}
_LINKS = ("probit", "mc", "bridge")


def _value(option: object) -> str:
    """An option's string, whether laplace-torch's enum or a plain string."""
    return str(getattr(option, "value", option))


def _pick(option: object, table: dict[str, str] | tuple[str, ...], name: str) -> str:
    value = _value(option)
    if value not in table:
        raise ValueError(
            f"{name}={value!r} has no counterpart in laplacefim; supported: {list(table)} "
            "(see docs/migrating.md)."
        )
    return table[value] if isinstance(table, dict) else value


def _curvature(backend: object, backend_kwargs: dict[str, Any] | None) -> str:
    """laplace-torch's backend class (or its name) as a curvature kind."""
    if backend is None:
        return "ggn"
    name = getattr(backend, "__name__", str(backend))
    stochastic = bool((backend_kwargs or {}).get("stochastic", False))
    if name.endswith("EF"):
        return "empirical_fisher"
    if name.endswith("GGN"):
        return "fisher" if stochastic else "ggn"
    raise ValueError(
        f"backend={name!r} has no counterpart; laplacefim has its own engine: a *GGN backend "
        "(stochastic=True for the MC Fisher) or an *EF backend is understood."
    )


def _refuse(name: str, value: object, allowed: object) -> None:
    if value != allowed:
        raise ValueError(
            f"{name}={value!r} is not supported by laplacefim's compatibility layer "
            f"(only {allowed!r}); see docs/migrating.md."
        )


class Laplace:
    """laplace-torch's ``Laplace(...)`` on laplacefim (see the module docstring).

    The wrapped :class:`laplacefim.Laplace` is ``self.la``, for everything beyond
    laplace-torch's API.

    Raises:
        ValueError: For options with no counterpart here (``subset_of_weights=
            "subnetwork"``, ``hessian_structure="gp"``, a non-zero ``prior_mean``,
            ``enable_backprop=True``, other backends), named in the message.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Any,
        subset_of_weights: Any = "last_layer",
        hessian_structure: Any = "kron",
        *,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: Any = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not bool(torch.as_tensor(prior_mean).eq(0).all()):
            raise ValueError("prior_mean must be 0 here: laplacefim's prior is centred at 0.")
        _refuse("enable_backprop", bool(enable_backprop), False)
        _refuse("asdl_fisher_kwargs", asdl_fisher_kwargs, None)
        self.likelihood = _pick(likelihood, _LIKELIHOODS, "likelihood")
        self.la = _Laplace(
            model,
            self.likelihood,
            subset=_pick(subset_of_weights, _SUBSETS, "subset_of_weights"),
            structure=_pick(hessian_structure, _STRUCTURES, "hessian_structure"),
            curvature=_curvature(backend, backend_kwargs),
            prior_precision=prior_precision,
            sigma_noise=sigma_noise,
            temperature=temperature,
            y_key=dict_key_y,
        )
        self.dict_key_x = dict_key_x
        self.model = model

    # ------------------------------------------------------------------ attributes
    @property
    def prior_precision(self) -> Tensor:
        """The prior precision, 1-d as in laplace-torch (``(1,)`` for a scalar; settable)."""
        return self.la.prior_precision.reshape(-1)

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        self.la.prior_precision = _detached(value)

    @property
    def sigma_noise(self) -> Tensor:
        """The observation noise (settable)."""
        return self.la.sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        self.la.sigma_noise = _detached(value)

    @property
    def temperature(self) -> float:
        return self.la.temperature

    @property
    def n_params(self) -> int:
        return self.la.n_params

    @property
    def n_data(self) -> int:
        return self.la.n_data

    @property
    def mean(self) -> Tensor:
        return self.la.mean

    @property
    def log_likelihood(self) -> Tensor:
        return self.la.log_likelihood

    @property
    def posterior_precision(self) -> Any:
        """laplacefim's :class:`~laplacefim.PosteriorPrecision` (``to_dense()`` for a matrix)."""
        return self.la.posterior_precision

    @property
    def posterior_covariance(self) -> Tensor:
        """The dense posterior covariance ``(P, P)`` (small ``P`` only)."""
        precision = self.la.posterior_precision.to_dense().double()
        return torch.cholesky_inverse(torch.linalg.cholesky(precision))

    # ------------------------------------------------------------------ fitting
    def fit(
        self, train_loader: Iterable[Any], override: bool = True, progress_bar: bool = False
    ) -> None:
        """Fit the curvature (``override=False``, adding to a previous fit, is refused)."""
        _refuse("override", bool(override), True)
        self.la.fit(train_loader, progress=progress_bar)

    def optimize_prior_precision(
        self,
        pred_type: Any = "glm",
        method: Any = "marglik",
        n_steps: int = 100,
        lr: float = 0.1,
        init_prior_prec: float | Tensor = 1.0,
        prior_structure: Any = "scalar",
        val_loader: Iterable[Any] | None = None,
        loss: Any = None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx: Any = "probit",
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
    ) -> None:
        """Tune the prior precision (only the prior: the noise stays, as in laplace-torch).

        ``"marglik"`` maximises the evidence by Newton's method (``n_steps``, ``lr`` and
        ``init_prior_prec`` are not needed); ``"gridsearch"`` picks the grid's prior with
        the lowest validation NLL of the GLM probit predictive.
        """
        chosen = _value(method)
        structure = _pick(prior_structure, _PRIORS, "prior_structure")
        if torch.as_tensor(init_prior_prec).numel() != 1:
            raise ValueError(
                "init_prior_prec with one value per layer or parameter is not supported; pass "
                "prior_structure='layerwise' or 'diag' instead (the optimum does not depend on "
                "the start here)."
            )
        if chosen == "marglik":
            self.la.tune_prior("marglik", structure, tune_noise=False)
            return
        if chosen != "gridsearch":
            raise ValueError(f"method={chosen!r}: expected 'marglik' or 'gridsearch'.")
        _refuse("loss", loss, None)
        _refuse("pred_type", _value(pred_type), "glm")
        _refuse("link_approx", _value(link_approx), "probit")
        grid = torch.logspace(
            log_prior_prec_min,
            log_prior_prec_max,
            grid_size,
            base=log_prior_prec_base,
            dtype=torch.float64,
        )
        self.la.tune_prior("gridsearch", val_loader=val_loader, grid=grid)

    def log_marginal_likelihood(
        self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None
    ) -> Tensor:
        """The evidence; as in laplace-torch, the values passed become the current ones."""
        value = self.la.log_marginal_likelihood(prior_precision, sigma_noise)
        if prior_precision is not None:
            self.prior_precision = prior_precision
        if sigma_noise is not None:
            self.sigma_noise = sigma_noise
        return value

    # ------------------------------------------------------------------ predictions
    def __call__(
        self,
        x: Any,
        pred_type: Any = "glm",
        joint: bool = False,
        link_approx: Any = "probit",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        **model_kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Probabilities ``(B, C)``; for regression ``(f_mu (B, K), f_var (B, K, K))``
        (``(B, K)`` with ``diagonal_output``), the functional variance without noise."""
        _refuse("joint", bool(joint), False)
        _refuse("model_kwargs", model_kwargs, {})
        method = _pick(pred_type, ("glm", "nn"), "pred_type")
        link = _pick(link_approx, _LINKS, "link_approx")
        if self.likelihood == "classification":
            if method == "nn" and link != "mc":
                raise ValueError(
                    "pred_type='nn' takes link_approx='mc' only (as in laplace-torch)."
                )
            pred = self.la.predict(
                x, method, link if method == "glm" else "probit", n_samples, generator=generator
            )
            return pred.probs  # type: ignore[return-value]
        joint = method == "glm" and not diagonal_output  # nn: per-output variances, as there
        pred = self.la.predict(
            x, method, "probit", n_samples, generator=generator, joint_outputs=joint
        )
        if joint and pred.logit_cov is not None:
            return pred.mean, pred.logit_cov  # type: ignore[return-value]
        return pred.mean, pred.epistemic_var  # type: ignore[return-value]

    def predictive_samples(
        self,
        x: Any,
        pred_type: Any = "glm",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Samples ``(S, B, C)``: probabilities (classification) or outputs (regression)."""
        method = _pick(pred_type, ("glm", "nn"), "pred_type")
        samples = self.la.predictive_samples(x, n_samples, method=method, generator=generator)
        return samples.softmax(-1) if self.likelihood == "classification" else samples

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """Weight samples ``(S, P)``."""
        return self.la.sample(n_samples, generator=generator)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return self.la.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.la.load_state_dict(state_dict)


def _detached(value: float | Tensor) -> float | Tensor:
    return value.detach() if isinstance(value, Tensor) else value


def marglik_training(
    model: nn.Module,
    train_loader: Iterable[Any],
    likelihood: Any = "classification",
    hessian_structure: Any = "kron",
    backend: Any = None,
    optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_kwargs: dict[str, Any] | None = None,
    scheduler_cls: Any = None,
    scheduler_kwargs: dict[str, Any] | None = None,
    n_epochs: int = 300,
    lr_hyp: float = 0.1,
    prior_structure: Any = "layerwise",
    n_epochs_burnin: int = 0,
    n_hypersteps: int = 10,
    marglik_frequency: int = 1,
    prior_prec_init: float = 1.0,
    sigma_noise_init: float = 1.0,
    temperature: float = 1.0,
    fix_sigma_noise: bool = False,
    progress_bar: bool = False,
    enable_backprop: bool = False,
    dict_key_x: str = "input_ids",
    dict_key_y: str = "labels",
) -> tuple[Laplace, nn.Module, list[float], list[float]]:
    """laplace-torch's ``marglik_training`` on :func:`laplacefim.train_marglik`.

    Returns ``(la, model, margliks, losses)``: the fitted all-weights posterior (this
    module's :class:`Laplace`), the trained model, the negative log evidence after each
    epoch that took hyperparameter steps (one value per such epoch; laplace-torch records
    one per Adam step on the hyperparameters), and each epoch's loss. Learning-rate
    schedulers are refused; a ``weight_decay`` in ``optimizer_kwargs`` is dropped with a
    warning (the learned prior is the weight decay).
    """
    _refuse("scheduler_cls", scheduler_cls, None)
    _refuse("enable_backprop", bool(enable_backprop), False)
    name = _pick(likelihood, _LIKELIHOODS, "likelihood")
    options = dict(optimizer_kwargs or {"lr": 1e-3})
    lr = float(options.pop("lr", 1e-3))
    if options.pop("weight_decay", 0):
        warnings.warn(
            "weight_decay in optimizer_kwargs is ignored: the learned prior is the weight decay "
            "(laplace-torch drops it too).",
            UserWarning,
            stacklevel=2,
        )

    def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
        return optimizer_cls(params, lr=lr, **options)

    result = train_marglik(
        model,
        train_loader,
        name,
        epochs=n_epochs,
        lr=lr,
        structure=_pick(hessian_structure, _STRUCTURES, "hessian_structure"),
        curvature=_curvature(backend, None),
        prior_structure=_pick(prior_structure, _PRIORS, "prior_structure"),
        optimizer=optimizer,
        marglik_frequency=marglik_frequency,
        n_hypersteps=n_hypersteps,
        burnin=n_epochs_burnin,
        prior_precision=prior_prec_init,
        sigma_noise=sigma_noise_init,
        tune_noise=not fix_sigma_noise,
        progress=progress_bar,
        temperature=temperature,
        y_key=dict_key_y,
    )
    wrapped = Laplace.__new__(Laplace)
    wrapped.likelihood, wrapped.la, wrapped.model = name, result.laplace, result.model
    wrapped.dict_key_x = dict_key_x
    margliks = [  # laplace-torch records the negative log evidence
        -e.log_marginal_likelihood for e in result.history if e.log_marginal_likelihood is not None
    ]
    losses = [e.loss for e in result.history]
    return wrapped, result.model, margliks, losses


__all__ = ["Laplace", "marglik_training"]
