"""Natural-gradient fine-tuning of a fitted posterior's parameters on the MAP objective."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from laplacefim import checks
from laplacefim.config import CurvatureConfig, FitState, Hyperparameters
from laplacefim.fitting import batch_log_likelihood, model_device
from laplacefim.inputs import to_device
from laplacefim.optim import NaturalGradient


def finetune(
    model: nn.Module,
    config: CurvatureConfig,
    hyper: Hyperparameters,
    fit: FitState,
    loader: Iterable[Any],
    *,
    epochs: int,
    lr: float,
    generator: torch.Generator | None,
    options: dict[str, Any],
) -> None:
    """Train the chosen parameters with natural-gradient steps preconditioned by the fit.

    Each step minimises the batch mean of the negative log-likelihood plus the Gaussian
    prior ``½ P₀ ‖θ‖² / N``; the fitted curvature starts the moving average (when its
    curvature kind is the one the steps use). ``options`` go to :class:`NaturalGradient`
    (``kl_clip`` defaults to 1e-3: unclipped steps of size 1 can diverge).

    Raises:
        ValueError: For ``epochs`` < 1 or bad options.
    """
    checks.integer(epochs, "epochs")
    prior = float(fit.layout.per_param(hyper.prior_precision.to(fit.mean)).mean())
    options = dict(options)
    kind = options.pop("curvature", config.kind)
    options.setdefault("kl_clip", 1e-3)
    options.setdefault("fisher_samples", config.fisher_samples)
    options.setdefault("io", config.io)
    ngd = NaturalGradient(
        model,
        config.likelihood,
        n_data=fit.n_data,
        structure=config.structure,
        curvature=kind,
        subset=list(fit.selection.names),
        prior_precision=prior,
        lr=lr,
        sigma_noise=float(hyper.sigma_noise.reshape(-1)[0]),
        **options,
    )
    if ngd.curvature_kind is config.kind:
        ngd.set_statistics(fit.curvature, fit.n_data)
    noise = hyper.sigma_noise
    device = model_device(model)
    for _ in range(epochs):
        for index, batch in enumerate(loader):
            x, y = config.io.split(batch, index)
            x, y = to_device(x, device), y.to(device)
            for p in fit.selection.params:
                p.grad = None
            batch = batch_log_likelihood(model, config, x, y, noise)
            nll = -batch.value / batch.rows
            theta = torch.cat([p.reshape(-1) for p in fit.selection.params])
            (nll + 0.5 * prior * theta.square().sum() / fit.n_data).backward()
            ngd.step(x, y, generator=generator)
