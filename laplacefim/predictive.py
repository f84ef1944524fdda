"""Predictive distributions: the linearised (GLM) covariance, links, and weight sampling.

The GLM predictive linearises the model around the mean, ``f(x; θ) ≈ f(x; θ*) + J(x)(θ − θ*)``,
so the outputs are Gaussian with covariance ``J Σ Jᵀ``. It is computed per block from each
layer's captured inputs ``a`` and output gradients ``g`` (one backward of the ``C`` output
columns), in the block's eigenbasis: for a Kronecker block of a Linear layer,
``(JΣJᵀ)_{cc'} = Σ_{ij} ĝ_{ci} ĝ_{c'i} â_j² / (s λ_i μ_j + δ)`` with ``ĝ = Q_Gᵀg`` and
``â = Q_Aᵀa``. A per-sample Jacobian is formed only where no such contraction exists
(a full all-weights posterior, weights shared over positions, custom modules), one
layer and one chunk of inputs at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from laplacefim.curvature.engine import Backprop, CurvatureEngine, Slot
from laplacefim.options import Likelihood, Link, Structure
from laplacefim.structures import Block, LinearDenseBlock
from laplacefim.structures.eigen import DenseBasis, IdentityBasis, KronBasis, PrecisionEigen


@dataclass(frozen=True)
class Prediction:
    """A prediction, the same type for every likelihood; fields that do not apply are None.

    Attributes:
        probs: Class probabilities ``(B, C)`` (classification) or ``P(y = 1)`` ``(B,)``
            (binary).
        logit_mean: Mean of the logits ``(B, C)`` (classification) or ``(B,)`` (binary).
        logit_var: Variance of the logits, same shape as ``logit_mean``.
        logit_cov: Covariance of the logits ``(B, C, C)`` when ``joint_outputs=True``.
        mean: Predictive mean ``(B, K)`` (regression).
        epistemic_var: Variance from the posterior over weights ``(B, K)`` (regression).
        aleatoric_var: Observation noise ``σ²`` ``(B, K)`` (regression).
        var: ``epistemic_var + aleatoric_var`` ``(B, K)`` (regression).
    """

    probs: Tensor | None = None
    logit_mean: Tensor | None = None
    logit_var: Tensor | None = None
    logit_cov: Tensor | None = None
    mean: Tensor | None = None
    epistemic_var: Tensor | None = None
    aleatoric_var: Tensor | None = None
    var: Tensor | None = None


def _contract(j_hat: Tensor, inverse: Tensor) -> Tensor:
    """``Σ_p Ĵ_{cbp} Ĵ_{dbp} / d_p`` for coordinates ``(C, B, p)``: ``(B, C, C)``."""
    return torch.einsum("cbp,dbp->bcd", j_hat * inverse, j_hat)


def _dense_input_weight(
    engine: CurvatureEngine, slot: Slot, bp: Backprop, precision: PrecisionEigen
) -> Tensor | None:
    """Contraction for a Linear/Conv2d weight seen once per datum; None if it does not apply."""
    module_name = slot.module_name
    if len(bp.calls[module_name]) != 1 or not isinstance(
        precision.basis, IdentityBasis | KronBasis
    ):
        return None
    rows = engine.rows(engine.modules[module_name], bp.calls[module_name], bp.grads[module_name])
    if rows.inputs.shape[1] != 1:
        return None
    a, g = rows.inputs[:, 0], rows.grads[:, :, 0]
    if isinstance(precision.basis, KronBasis):
        if precision.basis.first is not None:
            g = g @ precision.basis.first
        if precision.basis.second is not None:
            a = a @ precision.basis.second
    inverse = (1.0 / precision.values).reshape(g.shape[-1], a.shape[-1])
    weights = a.square() @ inverse.T  # (B, d_out)
    return torch.einsum("cbo,dbo->bcd", g * weights, g)


def _linear_dense(
    engine: CurvatureEngine, block: LinearDenseBlock, bp: Backprop, precision: PrecisionEigen
) -> Tensor | None:
    """Contraction for the dense block of one Linear layer: costs ``B·P²``, not ``C·B·P²``."""
    module_name = next(iter(engine.modules))
    if len(bp.calls[module_name]) != 1 or not isinstance(precision.basis, DenseBasis):
        return None
    rows = engine.rows(engine.modules[module_name], bp.calls[module_name], bp.grads[module_name])
    if rows.inputs.shape[1] != 1:
        return None
    a, g = rows.inputs[:, 0], rows.grads[:, :, 0]
    if block.bias:
        ones = a.new_ones(a.shape[0], 1)
        a = torch.cat([a, ones], dim=1) if block.weight else ones
    q = precision.basis.q
    q_grid = q.new_zeros(block.d_out * block.d_aug, q.shape[1])
    q_grid[block._order()] = q
    q_grid = q_grid.reshape(block.d_out, block.d_aug, -1)
    projected = torch.einsum("bi,oik->bok", a, q_grid)
    j_hat = torch.einsum("cbo,bok->cbk", g, projected)
    return _contract(j_hat, 1.0 / precision.values)


def glm_covariance(
    engine: CurvatureEngine, blocks: list[Block], precisions: list[PrecisionEigen], bp: Backprop
) -> Tensor:
    """``J Σ Jᵀ`` for one chunk of inputs, ``(B, C, C)``, summed over the posterior's blocks.

    Args:
        engine: The engine the posterior was fitted with (same parameters and structure).
        blocks: The fitted curvature blocks, in flat order.
        precisions: Their decomposed posterior precisions.
        bp: The chunk's forward pass with the output columns backpropagated.
    """
    n_out, batch = bp.outputs.shape[1], bp.outputs.shape[0]
    cov = bp.outputs.new_zeros(batch, n_out, n_out, dtype=engine.dtype)
    by_module: dict[str, list[Slot]] = {}
    for slot in engine.slots:
        by_module.setdefault(slot.module_name, []).append(slot)
    if engine.structure is Structure.FULL:
        block, precision = blocks[0], precisions[0]
        found = (
            _linear_dense(engine, block, bp, precision)
            if isinstance(block, LinearDenseBlock)
            else None
        )
        if found is not None:
            return cov + found
        per_sample = engine.per_sample(by_module, bp.calls, bp.grads)
        jac = torch.cat([per_sample[s.name] for s in engine.slots], dim=2)
        return cov + _contract(precision.basis.to_basis(jac), 1.0 / precision.values)
    for slot, precision in zip(engine.slots, precisions, strict=True):
        found = None
        if engine.rule_kind(slot) == "dense_input" and slot.local == "weight":
            found = _dense_input_weight(engine, slot, bp, precision)
        if found is None:
            per_sample = engine.per_sample({slot.module_name: [slot]}, bp.calls, bp.grads)
            j_hat = precision.basis.to_basis(per_sample[slot.name])
            found = _contract(j_hat, 1.0 / precision.values)
        cov = cov + found
    return cov


def probit(mean: Tensor, var: Tensor) -> Tensor:
    """Probit approximation: logits scaled by ``1/√(1 + π var / 8)``, then softmax/sigmoid."""
    return mean / torch.sqrt(1.0 + math.pi / 8.0 * var)


def laplace_bridge(mean: Tensor, var: Tensor) -> Tensor:
    """Dirichlet mean of the Laplace bridge of ``N(mean, diag(var))`` over ``C`` logits.

    ``α_c = (1 − 2/C + e^{μ_c} Σ_k e^{−μ_k} / C²) / σ_c²``; the probabilities are ``α / Σα``.
    """
    n_classes = mean.shape[-1]
    log_term = mean + torch.logsumexp(-mean, dim=-1, keepdim=True) - 2 * math.log(n_classes)
    alpha = (1.0 - 2.0 / n_classes + log_term.exp()) / var.clamp_min(torch.finfo(var.dtype).tiny)
    return alpha / alpha.sum(-1, keepdim=True)


def mc_logits(
    mean: Tensor, cov: Tensor, n_samples: int, generator: torch.Generator | None
) -> Tensor:
    """Samples of the logits from ``N(mean, cov)`` per input: ``(S, B, C)``."""
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    jitter = 1e-10 * cov.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True)[..., None].clamp_min(
        1e-30
    )
    chol, _ = torch.linalg.cholesky_ex(cov + jitter * eye)
    z = torch.randn(
        (n_samples, *mean.shape), dtype=mean.dtype, device=mean.device, generator=generator
    )
    return mean + torch.einsum("bcd,sbd->sbc", chol, z)


def glm_moments(
    engine: CurvatureEngine,
    blocks: list[Block],
    precisions: list[PrecisionEigen],
    x: Tensor,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """Mean ``(B, C)`` and covariance ``(B, C, C)`` of the linearised outputs, chunk by chunk."""
    means, covs = [], []
    for chunk in x.split(chunk_size):
        bp = engine.jacobian_rows(chunk)
        means.append(bp.outputs.to(engine.dtype))
        covs.append(glm_covariance(engine, blocks, precisions, bp))
    return torch.cat(means), torch.cat(covs)


def _regression(mean: Tensor, cov: Tensor, sigma_noise: Tensor, joint_outputs: bool) -> Prediction:
    """Regression predictive: epistemic ``diag(cov)`` plus aleatoric ``σ²``."""
    epistemic = cov.diagonal(dim1=-2, dim2=-1)
    aleatoric = sigma_noise.to(mean).square().expand_as(mean)
    return Prediction(
        logit_cov=cov if joint_outputs else None,
        mean=mean,
        epistemic_var=epistemic,
        aleatoric_var=aleatoric,
        var=epistemic + aleatoric,
    )


def gaussian_prediction(
    likelihood: Likelihood,
    mean: Tensor,
    cov: Tensor,
    *,
    link: Link,
    sigma_noise: Tensor,
    n_samples: int,
    generator: torch.Generator | None,
    joint_outputs: bool,
) -> Prediction:
    """Turn a Gaussian over the outputs into the likelihood's predictive."""
    var = cov.diagonal(dim1=-2, dim2=-1)
    if likelihood is Likelihood.REGRESSION:
        return _regression(mean, cov, sigma_noise, joint_outputs)
    if likelihood is Likelihood.BINARY:
        mean, var = mean[:, 0], var[:, 0]
        if link is Link.PROBIT:
            probs = probit(mean, var).sigmoid()
        elif link is Link.MC:
            probs = mc_logits(mean[:, None], cov, n_samples, generator)[..., 0].sigmoid().mean(0)
        else:
            raise ValueError(
                "link='bridge' needs several classes; use link='probit' or 'mc' with "
                "likelihood='binary'."
            )
        return Prediction(probs=probs, logit_mean=mean, logit_var=var)
    if link is Link.PROBIT:
        probs = probit(mean, var).softmax(-1)
    elif link is Link.MC:
        probs = mc_logits(mean, cov, n_samples, generator).softmax(-1).mean(0)
    else:
        probs = laplace_bridge(mean, var)
    return Prediction(
        probs=probs, logit_mean=mean, logit_var=var, logit_cov=cov if joint_outputs else None
    )


def sampled_prediction(
    likelihood: Likelihood, samples: Tensor, *, sigma_noise: Tensor, joint_outputs: bool
) -> Prediction:
    """The predictive from output samples ``(S, B, C)`` of sampled weights."""
    mean = samples.mean(0)
    centred = samples - mean
    cov = torch.einsum("sbc,sbd->bcd", centred, centred) / max(samples.shape[0] - 1, 1)
    var = cov.diagonal(dim1=-2, dim2=-1)
    if likelihood is Likelihood.REGRESSION:
        return _regression(mean, cov, sigma_noise, joint_outputs)
    if likelihood is Likelihood.BINARY:
        probs = samples[..., 0].sigmoid().mean(0)
        return Prediction(probs=probs, logit_mean=mean[:, 0], logit_var=var[:, 0])
    return Prediction(
        probs=samples.softmax(-1).mean(0),
        logit_mean=mean,
        logit_var=var,
        logit_cov=cov if joint_outputs else None,
    )


def linearised_samples(
    model: torch.nn.Module,
    names: tuple[str, ...],
    deltas: Tensor,
    x: Tensor,
    *,
    chunk_size: int,
    sample_chunk: int = 128,
) -> Tensor:
    """Function samples ``f(x) + J(x) δₛ`` of the linearised model, ``(S, B, C)``.

    Every input of a sample shares the same weight draw ``δₛ``, so the samples carry the
    posterior's correlations across inputs. ``J δ`` is a forward-mode product (``jvp``);
    no Jacobian is built.
    """
    params = dict(model.named_parameters())
    primal = {name: params[name].detach() for name in names}
    shapes = [primal[name].shape for name in names]
    sizes = [primal[name].numel() for name in names]

    def tangents(delta: Tensor) -> dict[str, Tensor]:
        parts = delta.split(sizes)
        return {n: p.reshape(s).to(primal[n]) for n, p, s in zip(names, parts, shapes, strict=True)}

    out = []
    for chunk in x.split(chunk_size):

        def function(p: dict[str, Tensor], chunk: Tensor = chunk) -> Tensor:
            return torch.func.functional_call(model, p, (chunk,))

        def one(delta: Tensor, function: Any = function) -> Any:
            return torch.func.jvp(function, (primal,), (tangents(delta),))

        rows = []
        for part in deltas.split(sample_chunk):
            value, tangent = torch.func.vmap(one)(part)
            rows.append(value + tangent)
        samples = torch.cat(rows)
        out.append(samples.reshape(samples.shape[0], samples.shape[1], -1))
    return torch.cat(out, dim=1)


def sampled_outputs(
    model: torch.nn.Module,
    params: tuple[torch.nn.Parameter, ...],
    weights: Tensor,
    x: Tensor,
    *,
    chunk_size: int,
) -> Tensor:
    """Outputs ``(S, B, C)`` of the model with the chosen parameters set to each sample."""
    saved = [p.detach().clone() for p in params]
    outputs = []
    try:
        with torch.no_grad():
            for weight in weights:
                for p, part in zip(params, weight.split([p.numel() for p in params]), strict=True):
                    p.copy_(part.view_as(p))
                out = torch.cat([model(chunk) for chunk in x.split(chunk_size)])
                outputs.append(out.reshape(out.shape[0], -1))
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
    return torch.stack(outputs)


def predictive_nll(likelihood: Likelihood, prediction: Prediction, y: Tensor) -> Tensor:
    """Summed negative log predictive density of targets ``y`` under a prediction."""
    tiny = torch.finfo(torch.float64).tiny
    if likelihood is Likelihood.CLASSIFICATION:
        probs = prediction.probs.to(torch.float64)  # type: ignore[union-attr]
        return -probs.gather(1, y.long().reshape(-1, 1)).clamp_min(tiny).log().sum()
    if likelihood is Likelihood.BINARY:
        probs = prediction.probs.to(torch.float64)  # type: ignore[union-attr]
        y = y.reshape(-1).to(probs)
        return -(
            y * probs.clamp_min(tiny).log() + (1 - y) * (1 - probs).clamp_min(tiny).log()
        ).sum()
    mean, var = prediction.mean, prediction.var
    y = y.reshape(mean.shape).to(mean)  # type: ignore[union-attr]
    return 0.5 * ((y - mean).square() / var + var.log() + math.log(2 * math.pi)).sum()  # type: ignore[operator, union-attr]
