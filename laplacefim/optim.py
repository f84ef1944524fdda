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

from laplacefim import checks, distributed
from laplacefim.config import CurvatureConfig
from laplacefim.fitting import eval_mode, make_engine, model_device
from laplacefim.inputs import ModelIO
from laplacefim.likelihoods import LikelihoodModel, make_likelihood
from laplacefim.options import CurvatureKind, parse_option
from laplacefim.structures import (
    BlockDiagonal,
    Plan,
    StructureSpec,
    make_structure,
    restore_blocks,
    save_blocks,
)
from laplacefim.structures.base import Decomposition
from laplacefim.structures.diag import DiagBlock
from laplacefim.subsets import SubsetSpec, select, validate_subset

Schedule = float | Callable[[int], float]
NONFINITE = ("skip", "raise")


def _value(schedule: Schedule, step: int) -> float:
    return float(schedule(step)) if callable(schedule) else float(schedule)


def _check_schedule(value: object, name: str) -> Schedule:
    if callable(value):
        return value
    return checks.number(value, name, non_negative=True)


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
        io: How the model is called on ``x`` (keyword inputs, picking the output), as for
            :class:`~laplacefim.Laplace`.
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
        likelihood: str | LikelihoodModel = "classification",
        *,
        n_data: int,
        structure: str | StructureSpec = "kron",
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
        io: ModelIO | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if subset == "last_layer":
            raise ValueError(
                "NaturalGradient needs explicit parameters; pass the last layer's names, "
                "e.g. subset=['fc.weight', 'fc.bias'] (Laplace.finetune does this for you)."
            )
        self.n_data = checks.integer(n_data, "n_data")
        self.update_interval = checks.integer(update_interval, "update_interval")
        self.decompose_interval = checks.integer(decompose_interval, "decompose_interval")
        if nonfinite not in NONFINITE:
            raise ValueError(
                f"nonfinite={nonfinite!r} is not valid; expected one of {list(NONFINITE)}."
            )
        self.config = CurvatureConfig(
            make_likelihood(likelihood),
            make_structure(structure),
            parse_option(curvature, CurvatureKind, "curvature"),
            validate_subset(subset),
            checks.integer(fisher_samples, "fisher_samples"),
            io=io or ModelIO(),
        )
        if not self.config.structure.single_pass:
            raise ValueError(
                f"structure={self.config.structure.name!r} needs several passes over the data "
                "per refresh; NaturalGradient takes a single-pass structure ('kron', 'diag' or "
                "'full')."
            )
        self.model = model
        self.selection = select(model, self.config.subset)
        self.prior_precision = checks.number(prior_precision, "prior_precision", non_negative=True)
        self.damping = _check_schedule(damping, "damping")
        self.lr = None if lr is None else _check_schedule(lr, "lr")
        self.ema_decay = _check_schedule(ema_decay, "ema_decay")
        self.kl_clip = None if kl_clip is None else _check_schedule(kl_clip, "kl_clip")
        self.nonfinite = nonfinite
        self.group = group
        noise = checks.hyperparameter(sigma_noise, "sigma_noise", allow_zero=False)
        self.config.likelihood.check_noise(noise)
        self.engine = make_engine(model, self.config, self.selection, noise)
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
        self._scratch: BlockDiagonal | None = None  # one batch's statistics, reused
        self._decomposed: BlockDiagonal | None = None  # the statistics the step now uses
        self._decompositions: list[Decomposition] | None = None
        self.n_steps = 0
        self.n_updates = 0

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

    # ---------------------------------------------------------------- statistics
    def set_statistics(self, curvature: BlockDiagonal, n_data: int) -> None:
        """Start from a fitted curvature (for example a Laplace fit): stored per datum.

        Raises:
            ValueError: If its layout does not match this preconditioner's.
        """
        self._check_layout(curvature)
        self.statistics = curvature.clone().scale_(1.0 / n_data)
        self._decompositions = None
        self.n_updates = max(self.n_updates, 1)

    def _check_layout(self, curvature: BlockDiagonal) -> None:
        kinds = (*self.config.structure.block_types, DiagBlock)
        if curvature.numel != self.selection.n_params or not all(
            isinstance(block, kinds) for block in curvature.blocks
        ):
            raise ValueError(
                "the curvature's layout does not match this preconditioner's parameters "
                f"and structure ({self.structure!r} over {self.selection.n_params} parameters)."
            )
        names = [name for block in curvature.blocks for name in block.names]
        if list(dict.fromkeys(names)) != list(self.selection.names):
            raise ValueError(
                "the curvature's layout does not match this preconditioner's parameters: it "
                f"covers {list(dict.fromkeys(names))}, this one {list(self.selection.names)}."
            )

    def update_statistics(
        self, x: object, y: Tensor, generator: torch.Generator | None = None
    ) -> bool:
        """Fold one batch's per-datum curvature into the moving average.

        Returns:
            False if the batch's statistics were not finite (they are then ignored).
        """
        with eval_mode(self.model):  # later column parts are backpropagated in the loop below
            rows = self.engine.batch(x, y, generator)
            if self.statistics is None:
                plan = Plan(
                    tuple(
                        zip(
                            self.selection.names,
                            (p.numel() for p in self.selection.params),
                            strict=True,
                        )
                    ),
                    rows.segments,
                    self.config.kind,
                    self.config.kfac_approx,
                    self.config.max_full_params,
                    self.engine.dtype,
                    model_device(self.model),
                )
                batch = BlockDiagonal(self.config.structure.build(plan))
            elif self._scratch is None:
                batch = self._scratch = self.statistics.zeros_like()
            else:  # reused: a fresh copy of the layout per update costs more than the GEMMs
                batch = self._scratch.zero_()
            rows.each_part(lambda segments, first: batch.accumulate_(segments, inputs=first))
        _, n_data = distributed.exchange_status(
            False, int(rows.n_data), batch.state()[0].device, self.group
        )
        distributed.all_reduce_(batch.state(), self.group)
        finite = torch.stack([torch.isfinite(t).all() for t in batch.state()]).all()
        if not bool(finite):  # one host sync per update
            return False
        if self.statistics is None:
            self.statistics = batch.scale_(1.0 / n_data)
        else:
            decay = _value(self.ema_decay, self.n_steps)
            self.statistics.scale_(decay)
            for total, part in zip(self.statistics.state(), batch.state(), strict=True):
                total.add_(part, alpha=(1.0 - decay) / n_data)
        self.n_updates += 1
        return True

    def _decompose(self, statistics: BlockDiagonal | None = None) -> None:
        statistics = statistics or self.statistics
        if statistics is None:
            raise RuntimeError(
                "no curvature statistics yet; call update_statistics or precondition first."
            )
        self._decomposed = statistics.clone()
        self._decompositions = statistics.decompose()

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
        if self._decompositions is None or self._decomposed is None:
            self._decompose()
        decompositions: list[Decomposition] = self._decompositions  # type: ignore[assignment]
        shift = (self.prior_precision + _value(self.damping, self.n_steps)) / self.n_data
        if shift <= 0:
            raise ValueError(
                "damping and prior_precision are both 0: the step is undefined where F is singular."
            )
        dtype = self._decomposed.state()[0].dtype  # type: ignore[union-attr]
        prior = torch.tensor(shift, dtype=dtype, device=grad.device)
        sizes = self._decomposed.sizes  # type: ignore[union-attr]
        parts = grad.to(dtype).split(sizes)
        solved = [
            d.with_prior(1.0, prior).solve(part)
            for d, part in zip(decompositions, parts, strict=True)
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
        decomposed = self._decompositions is None or self.n_steps % self.decompose_interval == 0
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
            "structure": self.structure,
            "curvature": self.curvature_kind.value,
            "n_steps": self.n_steps,
            "n_updates": self.n_updates,
            "statistics": None if self.statistics is None else save_blocks(self.statistics),
            "decomposed": None if self._decomposed is None else save_blocks(self._decomposed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` made for the same model, subset and structure.

        Raises:
            ValueError: For a state of another model, subset or structure.
        """
        for key, here in (
            ("names", list(self.selection.names)),
            ("structure", self.structure),
            ("curvature", self.curvature_kind.value),
        ):
            if state[key] != here:
                raise ValueError(
                    f"the state was made for {key}={state[key]!r}; this preconditioner "
                    f"has {here!r}."
                )
        statistics = self._restore(state["statistics"])
        decomposed = self._restore(state.get("decomposed"))
        self.statistics, self._decomposed, self._decompositions = statistics, None, None
        if decomposed is not None:
            self._decompose(decomposed)  # the step goes on with the same decomposition
        self.n_steps, self.n_updates = int(state["n_steps"]), int(state["n_updates"])

    def _restore(self, saved: list[Any] | None) -> BlockDiagonal | None:
        if saved is None:
            return None
        blocks = restore_blocks(saved)
        try:
            self._check_layout(blocks)
        except ValueError as error:
            raise ValueError(f"the saved statistics do not fit: {error}") from error
        return blocks
