"""Evidence-driven training: the network on the MAP objective, its prior (and noise) by
the Laplace evidence, alternating (Immer et al., ICML 2021, "Scalable marginal likelihood
estimation for model selection in deep learning").

Every few epochs the curvature is fitted at the current weights and decomposed once; the
hyperparameters then maximise the evidence by Newton steps on their logarithms, which cost
O(P) each on the decomposition (:func:`laplacefim.marglik.tune_marglik`), so an evidence
step costs about one fit. Between evidence steps the prior acts as weight decay.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from laplacefim import checks, distributed
from laplacefim.fitting import batch_log_likelihood, model_device
from laplacefim.inputs import to_device
from laplacefim.laplace import Laplace
from laplacefim.options import PriorStructure, parse_option

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}


@dataclass(frozen=True)
class MarglikEpoch:
    """One epoch of :func:`train_marglik`.

    Attributes:
        epoch: The epoch, from 1.
        loss: The training objective per datum: the mean over the epoch's batches of
            the negative log-likelihood per datum, plus ``½ Σ δ θ² / N`` at the epoch's end.
        log_marginal_likelihood: The evidence after this epoch's hyperparameter steps, or
            None where the epoch took none.
        prior_precision: The prior after the epoch (0-d, ``(L,)`` or ``(P,)``).
        sigma_noise: The noise after the epoch.
        val_nll: Mean negative log-likelihood of the network on ``val_loader`` at this
            epoch's evidence step (None without ``val_loader`` or evidence step).
        seconds: Wall time of the epoch, its evidence step included.
    """

    epoch: int
    loss: float
    log_marginal_likelihood: float | None
    prior_precision: Tensor
    sigma_noise: Tensor
    val_nll: float | None
    seconds: float


@dataclass(frozen=True)
class MarglikResult:
    """What :func:`train_marglik` returns.

    Attributes:
        laplace: The posterior at the kept weights, with their learned prior and noise.
        model: The trained model (the same object that was passed in), holding the kept
            weights.
        history: One record per epoch.
        epoch: The epoch whose weights were kept: the evidence step with the highest
            evidence (``keep_best=True``), or the last epoch.
        log_marginal_likelihood: The log evidence of the kept weights: compare it across
            architectures.
    """

    laplace: Laplace
    model: nn.Module
    history: tuple[MarglikEpoch, ...]
    epoch: int
    log_marginal_likelihood: float


def train_marglik(
    model: nn.Module,
    train_loader: Iterable[Any],
    likelihood: str = "classification",
    *,
    epochs: int,
    lr: float = 1e-3,
    structure: str = "kron",
    curvature: str = "ggn",
    subset: Any = "all",
    prior_structure: str | PriorStructure = "layerwise",
    optimizer: str | Callable[..., torch.optim.Optimizer] = "adam",
    marglik_frequency: int = 5,
    n_hypersteps: int = 100,
    burnin: int = 0,
    prior_precision: float = 1.0,
    sigma_noise: float = 1.0,
    tune_noise: bool = True,
    val_loader: Iterable[Any] | None = None,
    keep_best: bool = True,
    progress: bool = False,
    generator: torch.Generator | None = None,
    **laplace_options: Any,
) -> MarglikResult:
    """Train ``model`` and its prior (and noise) together by the Laplace evidence.

    Each step minimises the batch's mean negative log-likelihood (divided by the
    temperature) plus ``½ Σ δ θ² / N`` with ``δ`` the current prior of each parameter.
    After the epochs ``burnin + k·marglik_frequency`` (k ≥ 1) and after the last one, the
    curvature is fitted at the current weights and the prior (and, for likelihoods with a
    noise, a scalar ``sigma_noise`` when ``tune_noise``) maximises the log evidence —
    Newton's method on the log-hyperparameters, at most ``n_hypersteps`` steps, on the
    decomposition (the per-parameter prior: its fixed point, see
    :meth:`Laplace.tune_prior`). Parameters outside ``subset`` keep ``prior_precision``
    as their weight decay. Before the first evidence step every trainable parameter gets
    ``prior_precision`` and ``N`` is ``len(train_loader.dataset)`` when the loader has
    one (else the rows counted in one pass over it); after it, ``N`` is the fitted count
    (tokens for token-level targets).

    The model trains in train mode; its mode on entry is restored at the end.

    With a ``torch.distributed`` process group, each rank trains on the batches its loader
    yields, gradients are averaged over ranks after each step (a no-op for a model already
    wrapped in ``DistributedDataParallel``; equal batch sizes on every rank make a step
    equal to the single-process step on the joined batch), and the fit all-reduces.

    Args:
        model: The network, in its initial state; trained in place.
        train_loader: Batches as for :meth:`Laplace.fit` (pairs or mappings); re-iterable.
        likelihood: A registered likelihood name.
        epochs: Passes over the data.
        lr: Learning rate of the optimiser.
        structure: The curvature structure of the evidence and of the returned posterior.
        curvature: ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
        subset: Which parameters the posterior (and the learned prior) covers.
        prior_structure: ``"scalar"``, ``"layerwise"`` or ``"diagonal"``.
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"`` or a factory
            ``(params, lr=...) -> Optimizer``; its own weight decay should stay 0.
        marglik_frequency: Epochs between evidence steps.
        n_hypersteps: Largest number of Newton (or fixed-point) steps per evidence step.
        burnin: Epochs before the first evidence step.
        prior_precision: Initial prior precision (the weight decay until the first step).
        sigma_noise: Initial observation noise (regression likelihoods).
        tune_noise: Learn ``sigma_noise`` by the evidence too.
        val_loader: Batches on which to record the network's NLL at each evidence step.
        keep_best: End with the weights, prior and posterior of the evidence step with the
            highest evidence (early stopping by evidence, as Immer et al. do; one copy of
            the weights and the curvature is kept); False ends with the last epoch's.
        progress: Show a progress bar over epochs (on rank 0).
        generator: Random generator for ``curvature="fisher"``.
        **laplace_options: Passed to :class:`Laplace` (``temperature``, ``x_key``,
            ``y_key``, ``call_kwargs``, ``output_key``, ``kfac_approx``, ...).

    Returns:
        The posterior at the kept weights (see ``keep_best``), the model holding them, the
        per-epoch history and the kept epoch.

    Raises:
        ValueError: For bad counts or options (listed), or anything :meth:`Laplace.fit`
            refuses.

    Example:
        >>> result = train_marglik(model, loader, "classification", epochs=50)
        >>> result.laplace.predict(x_test).probs, result.log_marginal_likelihood
    """
    epochs = checks.integer(epochs, "epochs")
    marglik_frequency = checks.integer(marglik_frequency, "marglik_frequency")
    n_hypersteps = checks.integer(n_hypersteps, "n_hypersteps")
    burnin = checks.integer(burnin, "burnin", minimum=0)
    lr = checks.number(lr, "lr", positive=True)
    prior_kind = parse_option(prior_structure, PriorStructure, "prior_structure")
    make_optimizer = _optimizer_factory(optimizer)
    la = Laplace(
        model,
        likelihood,
        subset=subset,
        structure=structure,
        curvature=curvature,
        prior_precision=prior_precision,
        sigma_noise=sigma_noise,
        **laplace_options,
    )
    config = la.config
    device = model_device(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params: list[Tensor] = [p for _, p in trainable]
    optim = make_optimizer(params, lr=lr)
    base_prior = float(prior_precision)
    priors = {name: p.detach().new_full((), base_prior) for name, p in trainable}
    decays = list(priors.values())  # in the order of params
    n_data = _data_count(train_loader, config, device)
    history: list[MarglikEpoch] = []
    best: tuple[float, int, dict[str, Tensor], dict[str, Any]] | None = None
    bar = tqdm(
        range(1, epochs + 1),
        desc="train_marglik",
        disable=not progress or distributed.rank() != 0,
    )
    was_training = model.training
    last_evidence = math.nan  # the last epoch always takes an evidence step
    for epoch in bar:
        start = time.perf_counter()
        model.train()
        noise = la.sigma_noise.to(device)
        total: Tensor | float = 0.0
        n_batches = 0
        for index, batch in enumerate(train_loader):
            x, y = config.io.split(batch, index)
            x, y = to_device(x, device), y.to(device)
            optim.zero_grad(set_to_none=True)
            scored = batch_log_likelihood(model, config, x, y, noise)
            nll = -scored.value / scored.count / la.temperature
            nll.backward()
            _average_gradients(params)
            _add_prior_gradient(params, decays, n_data)
            optim.step()
            total = total + nll.detach()
            n_batches += 1
        if n_batches == 0:
            raise ValueError("train_loader yielded no batch.")
        with torch.no_grad():
            penalty = sum(float((priors[n] * p.square()).sum()) for n, p in trainable)
        loss = float(total) / n_batches + 0.5 * penalty / n_data
        evidence: float | None = None
        val_nll: float | None = None
        if epoch == epochs or (epoch > burnin and (epoch - burnin) % marglik_frequency == 0):
            evidence = last_evidence = _evidence_step(
                la, train_loader, prior_kind, tune_noise, n_hypersteps, generator
            )
            n_data = la.n_data
            priors.update(la.parameter_priors)
            decays = list(priors.values())
            if keep_best and (best is None or evidence > best[0]):
                weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best = (evidence, epoch, weights, la.state_dict())
            if val_loader is not None:
                val_nll = _validation_nll(model, la, val_loader, device)
        record = MarglikEpoch(
            epoch,
            loss,
            evidence,
            la.prior_precision.detach().clone(),
            la.sigma_noise.detach().clone(),
            val_nll,
            time.perf_counter() - start,
        )
        history.append(record)
        if evidence is not None:
            bar.set_postfix(loss=f"{record.loss:.4g}", lml=f"{evidence:.6g}")
    kept, kept_evidence = epochs, last_evidence
    if best is not None and best[1] != epochs:
        kept_evidence, kept, weights, state = best
        model.load_state_dict(weights)
        la.load_state_dict(state)
    model.train(was_training)
    return MarglikResult(la, model, tuple(history), kept, kept_evidence)


def _optimizer_factory(
    optimizer: str | Callable[..., torch.optim.Optimizer],
) -> Callable[..., torch.optim.Optimizer]:
    if callable(optimizer):
        return optimizer
    if optimizer not in OPTIMIZERS:
        raise ValueError(
            f"optimizer={optimizer!r} is not valid; expected one of {sorted(OPTIMIZERS)} or a "
            "factory (params, lr=...) -> torch.optim.Optimizer."
        )
    return OPTIMIZERS[optimizer]


def _data_count(loader: Iterable[Any], config: Any, device: torch.device) -> int:
    """``len(loader.dataset)``, or the rows of one pass over the loader (summed over ranks)."""
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, Sized):
        return max(len(dataset), 1)
    rows = sum(int(config.io.split(batch, i)[1].shape[0]) for i, batch in enumerate(loader))
    _, total = distributed.exchange_status(False, rows, device)
    return max(total, 1)


def _average_gradients(params: Sequence[Tensor]) -> None:
    """Average gradients over ranks (nothing without a process group)."""
    if not distributed.active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    distributed.all_reduce_(grads)
    world = torch.distributed.get_world_size()
    for g in grads:
        g.div_(world)


def _add_prior_gradient(params: list[Tensor], priors: list[Tensor], n_data: int) -> None:
    """Add the prior's gradient ``δ θ / N`` to each parameter's gradient, without autograd
    (one fused call where every parameter has a gradient)."""
    with torch.no_grad():
        grads = [p.grad for p in params if p.grad is not None]
        if len(grads) == len(params):
            torch._foreach_addcmul_(grads, params, priors, value=1.0 / n_data)
            return
        for p, d in zip(params, priors, strict=True):
            decay = d * p / n_data
            p.grad = decay if p.grad is None else p.grad.add_(decay)


def _evidence_step(
    la: Laplace,
    loader: Iterable[Any],
    prior_structure: PriorStructure,
    tune_noise: bool,
    n_hypersteps: int,
    generator: torch.Generator | None,
) -> float:
    """Fit at the current weights, then maximise the evidence in the hyperparameters."""
    la.fit(loader, generator=generator)
    with warnings.catch_warnings():  # a capped number of steps per epoch is the point
        warnings.filterwarnings("ignore", "tune_prior did not converge", RuntimeWarning)
        result = la.tune_prior(
            "marglik", prior_structure, tune_noise=tune_noise, max_iter=n_hypersteps
        )
    return float(result.log_marginal_likelihood)


def _validation_nll(
    model: nn.Module, la: Laplace, loader: Iterable[Any], device: torch.device
) -> float:
    """Mean negative log-likelihood of the network (not the posterior) on ``loader``."""
    config = la.config
    noise = la.sigma_noise.to(device)
    total, count = 0.0, 0.0
    model.eval()
    with torch.no_grad():
        for index, batch in enumerate(loader):
            x, y = config.io.split(batch, index)
            scored = batch_log_likelihood(model, config, to_device(x, device), y.to(device), noise)
            total -= float(scored.value)
            count += int(scored.count)
    return total / max(count, 1.0) if count else math.nan


__all__ = ["MarglikEpoch", "MarglikResult", "train_marglik"]
