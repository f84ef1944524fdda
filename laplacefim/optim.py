"""Natural-gradient preconditioning on the same curvature structures as the posterior.

The Fisher information is both the Laplace posterior's precision and the metric of
natural-gradient descent. :class:`NaturalGradient` keeps an exponential moving average of
the per-datum curvature statistics (the same summable state a fit accumulates), decomposes
it at intervals, and replaces each gradient ``g`` by the solution ``d`` of

    (F̄ + (P₀ + λ) / N) d = g,

where ``F̄`` is the per-datum curvature, ``P₀`` the prior precision (a floor for the
damping), ``λ`` the Tikhonov damping and ``N`` the number of training data. With a loss that
is the batch *mean* of the negative log-likelihood, this is the Newton-like step
``(F + P₀ + λ)⁻¹ ∇L`` of the summed MAP objective ``L``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from laplacefim import distributed
from laplacefim.curvature import CurvatureEngine
from laplacefim.fitting import eval_mode
from laplacefim.likelihoods import make_likelihood
from laplacefim.options import CurvatureKind, Likelihood, Structure, parse_option
from laplacefim.structures import BlockDiagonal
from laplacefim.structures.eigen import CurvatureEigen
from laplacefim.subsets import SubsetSpec, select, validate_subset

Schedule = float | Callable[[int], float]
NONFINITE = ("skip", "raise")


def _value(schedule: Schedule, step: int) -> float:
    return float(schedule(step)) if callable(schedule) else float(schedule)


def _check_schedule(value: object, name: str) -> Schedule:
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(
            f"{name} must be a finite number or a callable of the step, got {value!r}."
        )
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class StepInfo:
    """What one call of :meth:`NaturalGradient.precondition` did.

    Attributes:
        step: The step counter after the call.
        skipped: True if the gradients were not finite and the step was skipped.
        updated_statistics: Whether the curvature statistics were refreshed.
        decomposed: Whether the decomposition was refreshed.
        kl_scale: Factor applied to the step by the KL trust region (1 if none).
    """

    step: int
    skipped: bool
    updated_statistics: bool
    decomposed: bool
    kl_scale: float


class NaturalGradient:
    """Natural-gradient preconditioner (and optimizer) on KFAC, diagonal or full curvature.

    Use it between ``loss.backward()`` and any optimizer's ``step()`` (momentum, weight
    decay and schedulers keep working), or on its own with ``lr=`` as a plain optimizer.

    Args:
        model: The model; its chosen parameters' ``.grad`` are preconditioned in place.
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        n_data: Number of training data ``N`` (scales the prior and damping per datum).
        structure: ``"kron"``, ``"diag"`` or ``"full"``.
        curvature: ``"fisher"`` (MC, about one extra backward), ``"ggn"`` or
            ``"empirical_fisher"``.
        subset: Which parameters, as in :class:`~laplacefim.Laplace`.
        damping: Tikhonov damping ``λ`` (a number or a callable of the step).
        prior_precision: ``P₀``, a scalar floor under the damping.
        lr: Learning rate for :meth:`step` and the KL trust region (number or callable).
        ema_decay: Weight of the old statistics in the moving average (number or callable).
        update_interval: Refresh the statistics every this many steps.
        decompose_interval: Refresh the decomposition every this many steps.
        kl_clip: If set, scale the step so that ``lr² dᵀg <= kl_clip``.
        optimizer: If given, checked to hold every chosen parameter.
        nonfinite: ``"skip"`` (leave gradients and statistics untouched) or ``"raise"``
            for non-finite gradients.
        sigma_noise: Regression noise.
        fisher_samples: Labels drawn per datum for ``curvature="fisher"``.
        group: With ``torch.distributed`` initialised, each batch's statistics are summed
            over the ranks of this group (the default group if None) before averaging.

    Raises:
        ValueError: For an unknown option, negative hyperparameters, or parameters missing
            from ``optimizer``.

    Example:
        >>> ngd = NaturalGradient(model, "classification", n_data=len(dataset), optimizer=opt)
        >>> loss = F.cross_entropy(model(x), y); loss.backward()
        >>> ngd.precondition(x, y); opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "classification",
        *,
        n_data: int,
        structure: str | Structure = "kron",
        curvature: str | CurvatureKind = "fisher",
        subset: SubsetSpec = "all",
        damping: Schedule = 1e-3,
        prior_precision: float = 0.0,
        lr: Schedule | None = None,
        ema_decay: Schedule = 0.95,
        update_interval: int = 1,
        decompose_interval: int = 10,
        kl_clip: Schedule | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        nonfinite: str = "skip",
        sigma_noise: float = 1.0,
        fisher_samples: int = 1,
        group: distributed.Group = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if subset == "last_layer":
            raise ValueError(
                "NaturalGradient needs explicit parameters; pass the last layer's names, "
                "e.g. subset=['fc.weight', 'fc.bias'] (Laplace.finetune does this for you)."
            )
        if isinstance(n_data, bool) or not isinstance(n_data, int) or n_data < 1:
            raise ValueError(f"n_data must be a positive integer, got {n_data!r}.")
        for name, value in (
            ("update_interval", update_interval),
            ("decompose_interval", decompose_interval),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if nonfinite not in NONFINITE:
            raise ValueError(
                f"nonfinite={nonfinite!r} is not valid; expected one of {list(NONFINITE)}."
            )
        if not math.isfinite(prior_precision) or prior_precision < 0:
            raise ValueError(f"prior_precision must be finite and >= 0, got {prior_precision!r}.")
        self.model = model
        self.likelihood = parse_option(likelihood, Likelihood, "likelihood")
        self.structure = parse_option(structure, Structure, "structure")
        self.curvature_kind = parse_option(curvature, CurvatureKind, "curvature")
        self.selection = select(model, validate_subset(subset))
        self.n_data = n_data
        self.damping = _check_schedule(damping, "damping")
        self.prior_precision = float(prior_precision)
        self.lr = None if lr is None else _check_schedule(lr, "lr")
        self.ema_decay = _check_schedule(ema_decay, "ema_decay")
        self.kl_clip = None if kl_clip is None else _check_schedule(kl_clip, "kl_clip")
        self.update_interval = update_interval
        self.decompose_interval = decompose_interval
        self.nonfinite = nonfinite
        self.group = group
        self.engine = CurvatureEngine(
            model,
            self.selection,
            self.structure,
            self.curvature_kind,
            make_likelihood(self.likelihood, torch.tensor(float(sigma_noise), dtype=torch.float64)),
            fisher_samples=fisher_samples,
            dtype=self.selection.params[0].dtype,
        )
        if optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [
                n
                for n, p in zip(self.selection.names, self.selection.params, strict=True)
                if id(p) not in held
            ]
            if missing:
                raise ValueError(
                    f"the optimizer does not hold these chosen parameters: {missing}; pass "
                    "them to the optimizer, or choose a subset it covers."
                )
        self.statistics: BlockDiagonal | None = None
        self._decomposed: BlockDiagonal | None = None  # the statistics the step now uses
        self._eigens: list[CurvatureEigen] | None = None
        self.n_steps = 0
        self.n_updates = 0

    # ---------------------------------------------------------------- statistics
    def set_statistics(self, curvature: BlockDiagonal, n_data: int) -> None:
        """Start from a fitted curvature (for example a Laplace fit): stored per datum.

        Raises:
            ValueError: If its layout does not match this preconditioner's.
        """
        zeros = self.engine.zeros().state()
        state = curvature.state()
        if len(state) != len(zeros) or any(
            a.shape != b.shape for a, b in zip(state, zeros, strict=True)
        ):
            raise ValueError(
                "the curvature's layout does not match this preconditioner's parameters "
                "and structure."
            )
        self.statistics = curvature.clone().scale_(1.0 / n_data)
        self._eigens = None
        self.n_updates = max(self.n_updates, 1)

    def update_statistics(
        self, x: object, y: Tensor, generator: torch.Generator | None = None
    ) -> bool:
        """Fold one batch's per-datum curvature into the moving average.

        Returns:
            False if the batch's statistics were not finite (they are then ignored).
        """
        with eval_mode(self.model):
            stats = self.engine.batch(x, y, generator)
        batch = self.engine.zeros().add_(stats.contributions)
        _, n_data = distributed.exchange_status(
            False, stats.n_data, batch.state()[0].device, self.group
        )
        distributed.all_reduce_(batch.state(), self.group)
        finite = torch.stack([torch.isfinite(t).all() for t in batch.state()]).all()
        if not bool(finite):  # one host sync per update
            return False
        if self.statistics is None:
            self.statistics = batch.scale_(1.0 / n_data)
        else:
            decay = _value(self.ema_decay, self.n_steps)
            self.statistics.scale_(decay).add_(batch.scale_((1.0 - decay) / n_data).state())
        self.n_updates += 1
        return True

    def _decompose(self, statistics: BlockDiagonal | None = None) -> None:
        statistics = statistics or self.statistics
        if statistics is None:
            raise RuntimeError(
                "no curvature statistics yet; call update_statistics or precondition first."
            )
        self._decomposed = statistics.clone()
        self._eigens = [block.decompose() for block in statistics.blocks]

    # ---------------------------------------------------------------- steps
    def _flat_grad(self) -> Tensor:
        grads = []
        for name, p in zip(self.selection.names, self.selection.params, strict=True):
            if p.grad is None:
                raise ValueError(f"parameter {name!r} has no gradient; call loss.backward() first.")
            grads.append(p.grad.reshape(-1))
        return torch.cat(grads)

    def direction(self, grad: Tensor) -> Tensor:
        """Solve ``(F̄ + (P₀ + λ)/N) d = grad`` for a flat gradient ``(P,)``."""
        if self._eigens is None:
            self._decompose()
        eigens: list[CurvatureEigen] = self._eigens  # type: ignore[assignment]
        shift = (self.prior_precision + _value(self.damping, self.n_steps)) / self.n_data
        if shift <= 0:
            raise ValueError(
                "damping and prior_precision are both 0: the step is undefined where F is singular."
            )
        dtype = eigens[0].eigenvalues.dtype
        prior = torch.tensor(shift, dtype=dtype, device=grad.device)
        parts = grad.to(dtype).split([e.eigenvalues.numel() for e in eigens])
        solved = [
            e.with_prior(1.0, prior).solve(part) for e, part in zip(eigens, parts, strict=True)
        ]
        return torch.cat(solved).to(grad.dtype)

    def precondition(
        self, x: object, y: Tensor, *, generator: torch.Generator | None = None
    ) -> StepInfo:
        """Refresh statistics and decomposition at their intervals; precondition ``.grad``.

        Call after ``loss.backward()`` (loss = batch mean of the NLL) and before the
        optimizer's ``step()``.
        """
        grad = self._flat_grad()
        if not bool(torch.isfinite(grad).all()):
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"non-finite gradients at step {self.n_steps}; lower the learning rate or "
                    "pass nonfinite='skip' to skip such steps."
                )
            for p in self.selection.params:
                p.grad = torch.zeros_like(p)
            self.n_steps += 1
            return StepInfo(self.n_steps, True, False, False, 0.0)
        updated = False
        if self.statistics is None or self.n_steps % self.update_interval == 0:
            updated = self.update_statistics(x, y, generator)
        decomposed = self._eigens is None or self.n_steps % self.decompose_interval == 0
        if decomposed:
            self._decompose()
        direction = self.direction(grad)
        kl_scale = 1.0
        if self.kl_clip is not None:
            lr = _value(self.lr, self.n_steps) if self.lr is not None else 1.0
            quad = float(lr**2 * (direction * grad).sum())
            if quad > 0:
                kl_scale = min(1.0, math.sqrt(_value(self.kl_clip, self.n_steps) / quad))
        offset = 0
        with torch.no_grad():
            for p in self.selection.params:
                n = p.numel()
                p.grad.copy_((kl_scale * direction[offset : offset + n]).view_as(p))  # type: ignore[union-attr]
                offset += n
        self.n_steps += 1
        return StepInfo(self.n_steps, False, updated, decomposed, kl_scale)

    def step(self, x: object, y: Tensor, *, generator: torch.Generator | None = None) -> StepInfo:
        """Precondition and apply ``θ ← θ − lr·d`` (use as a plain optimizer; needs ``lr``)."""
        if self.lr is None:
            raise ValueError(
                "step() needs lr=; or call precondition() and your optimizer's step()."
            )
        lr = _value(self.lr, self.n_steps)
        info = self.precondition(x, y, generator=generator)
        with torch.no_grad():
            for p in self.selection.params:
                p.add_(p.grad, alpha=-lr)  # type: ignore[arg-type]
        return info

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Counters, options and the moving-average statistics (tensors and plain values)."""
        return {
            "names": list(self.selection.names),
            "structure": self.structure.value,
            "curvature": self.curvature_kind.value,
            "n_steps": self.n_steps,
            "n_updates": self.n_updates,
            "statistics": None
            if self.statistics is None
            else [t.clone() for t in self.statistics.state()],
            "decomposed": None
            if self._decomposed is None
            else [t.clone() for t in self._decomposed.state()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` made for the same model, subset and structure.

        Raises:
            ValueError: For a state of another model, subset or structure.
        """
        for key, here in (
            ("names", list(self.selection.names)),
            ("structure", self.structure.value),
            ("curvature", self.curvature_kind.value),
        ):
            if state[key] != here:
                raise ValueError(
                    f"the state was made for {key}={state[key]!r}; this preconditioner "
                    f"has {here!r}."
                )
        statistics = self._restore(state["statistics"])
        decomposed = self._restore(state.get("decomposed"))
        self.statistics, self._decomposed, self._eigens = statistics, None, None
        if decomposed is not None:
            self._decompose(decomposed)  # the step goes on with the same decomposition
        self.n_steps, self.n_updates = int(state["n_steps"]), int(state["n_updates"])

    def _restore(self, tensors: list[Tensor] | None) -> BlockDiagonal | None:
        if tensors is None:
            return None
        blocks = self.engine.zeros()
        zeros = blocks.state()
        if len(zeros) != len(tensors) or any(
            a.shape != b.shape for a, b in zip(tensors, zeros, strict=True)
        ):
            raise ValueError("the saved statistics do not fit this model's parameters.")
        for target, value in zip(zeros, tensors, strict=True):
            target.copy_(value)
        return blocks
