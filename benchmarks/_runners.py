"""Library adapters: how each library computes one curvature configuration.

For every library, :func:`make_prepare` returns a *prepare* callable. Calling it
does the untimed set-up of one fit (building the Laplace object, the ASDL Fisher
maker, ...) and returns the *fit* callable, which is what the benchmark times.

What is timed, per library:

* ``ours``: ``laplacefim.Laplace(...).fit(loader)`` -- the ``fit`` call only;
  the decomposition is lazy and not part of it.
* ``laplace`` (laplace-torch 0.3): ``la.fit(loader)`` only, with the backend
  named by the variant (``CurvlinopsGGN`` is laplace-torch's default for every
  structure). In last-layer mode laplace-torch deep-copies the model when the
  object is built (untimed) and finds the last layer during ``fit`` (timed).
* ``curvlinops``: ``kron``: ``KFACLinearOperator(...)`` construction plus
  ``compute_kronecker_factors()``. ``full``: the ``GGNLinearOperator`` /
  ``FisherMCLinearOperator`` / ``EFLinearOperator`` construction plus ``op @ I``,
  which materialises the dense matrix (how laplace-torch uses it). curvlinops
  3.0.1 has no exact diagonal (only Hutchinson-type estimators), so no ``diag``.
* ``backpack``: one pass over the loader: forward, CE loss (sum), ``backward``
  inside ``with backpack(extension)``, and summing the per-batch quantities:
  diagonals; Kronecker factors (summed factor-wise, as laplace-torch does);
  for ``full`` the dense matrix ``V^T V`` from the per-batch square-root factors
  (``SqrtGGNExact`` / ``SqrtGGNMC``) or per-sample gradients (``BatchGrad``).
  ``extend`` is applied once, untimed.
* ``asdl`` (the ``asdl`` module of asdfghjkl 0.1a4): one pass over the loader
  of ``FisherMaker.forward_and_backward(accumulate=True)`` with
  ``FisherConfig(fisher_type, fisher_shapes=[shape], data_size=1)``.

For ``last_layer`` the direct libraries (curvlinops, BackPACK, ASDL) run on the
model's last ``Linear`` layer, fed with features that the rest of the network
computes under ``torch.no_grad`` batch by batch inside the timed region.
All curvatures are sums over the data (cross-entropy with reduction ``sum``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from _workloads import split_head
from torch import nn
from torch.utils.data import DataLoader

Fit = Callable[[], object]
Prepare = Callable[[], Fit]

SUBSETS = ("all", "last_layer")
STRUCTURES = ("diag", "kron", "ekfac", "full")
CURVATURES = ("ggn", "fisher", "empirical_fisher")
LIBS = ("ours", "laplace", "curvlinops", "backpack", "asdl")


@dataclass(frozen=True)
class Config:
    """One curvature configuration, in our package's vocabulary."""

    subset: str
    structure: str
    curvature: str


# laplace-torch 0.3 backends per curvature kind: (variant label, class name, backend kwargs).
_LAPLACE_BACKENDS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "ggn": [
        ("CurvlinopsGGN [default]", "CurvlinopsGGN", {}),
        ("BackPackGGN", "BackPackGGN", {}),
        ("AsdlGGN", "AsdlGGN", {}),
    ],
    "fisher": [
        ("CurvlinopsGGN(stochastic)", "CurvlinopsGGN", {"stochastic": True}),
        ("BackPackGGN(stochastic)", "BackPackGGN", {"stochastic": True}),
        ("AsdlGGN(stochastic)", "AsdlGGN", {"stochastic": True}),
    ],
    "empirical_fisher": [
        ("CurvlinopsEF", "CurvlinopsEF", {}),
        ("BackPackEF", "BackPackEF", {}),
        ("AsdlEF", "AsdlEF", {}),
    ],
}
# Combinations laplace-torch itself rejects ("Unavailable through Backpack.").
_LAPLACE_UNSUPPORTED = {("BackPackEF", "kron")}

# BackPACK: (structure, curvature) -> (extension, extension kwargs, parameter attribute).
_BACKPACK: dict[tuple[str, str], tuple[str, dict[str, Any], str]] = {
    ("diag", "ggn"): ("DiagGGNExact", {}, "diag_ggn_exact"),
    ("diag", "fisher"): ("DiagGGNMC", {"mc_samples": 1}, "diag_ggn_mc"),
    ("diag", "empirical_fisher"): ("SumGradSquared", {}, "sum_grad_squared"),
    ("kron", "ggn"): ("KFLR", {}, "kflr"),
    ("kron", "fisher"): ("KFAC", {"mc_samples": 1}, "kfac"),
    ("full", "ggn"): ("SqrtGGNExact", {}, "sqrt_ggn_exact"),
    ("full", "fisher"): ("SqrtGGNMC", {"mc_samples": 1}, "sqrt_ggn_mc"),
    ("full", "empirical_fisher"): ("BatchGrad", {}, "grad_batch"),
}

_CURVLINOPS_KFAC = {"ggn": "type-2", "fisher": "mc", "empirical_fisher": "empirical"}
_CURVLINOPS_FULL = {
    "ggn": "GGNLinearOperator",
    "fisher": "FisherMCLinearOperator",
    "empirical_fisher": "EFLinearOperator",
}
_ASDL_TYPES = {"ggn": "fisher_exact", "fisher": "fisher_mc", "empirical_fisher": "fisher_emp"}


class UnsupportedError(Exception):
    """The library does not compute this configuration."""


def variants(lib: str, cfg: Config, quick: bool = False) -> list[str]:
    """The variants of ``lib`` that compute ``cfg`` (empty: not supported)."""
    if lib == "ours":
        return ["Laplace"]
    if cfg.structure == "ekfac":  # among the peers, only curvlinops has EKFAC
        return (
            [f"EKFACLinearOperator({_CURVLINOPS_KFAC[cfg.curvature]})"]
            if lib == "curvlinops"
            else []
        )
    if lib == "laplace":
        labels = [
            label
            for label, cls, _ in _LAPLACE_BACKENDS[cfg.curvature]
            if (cls, cfg.structure) not in _LAPLACE_UNSUPPORTED
        ]
        return labels[:1] if quick else labels
    if lib == "curvlinops":
        if cfg.structure == "kron":
            return [f"KFACLinearOperator({_CURVLINOPS_KFAC[cfg.curvature]})"]
        if cfg.structure == "full":
            return [f"{_CURVLINOPS_FULL[cfg.curvature]} @ I"]
        return []
    if lib == "backpack":
        entry = _BACKPACK.get((cfg.structure, cfg.curvature))
        return [entry[0]] if entry else []
    if lib == "asdl":
        return [f"{_ASDL_TYPES[cfg.curvature]}/{cfg.structure}"]
    raise ValueError(f"unknown library {lib!r}")


class FeatureBatches:
    """Re-iterable ``(features, y)`` batches for last-layer curvature.

    The body runs under ``torch.no_grad`` on every pass, lazily, batch by batch.
    """

    def __init__(self, body: nn.Module, loader: DataLoader) -> None:
        self.body = body
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for X, y in self.loader:
            with torch.no_grad():
                features = self.body(X)
            yield features, y

    def __len__(self) -> int:
        return len(self.loader)


def _target(
    cfg: Config, model: nn.Sequential, loader: DataLoader
) -> tuple[nn.Module, DataLoader | FeatureBatches]:
    """The module a direct library differentiates and the batches it sees."""
    if cfg.subset == "all":
        return model, loader
    body, head = split_head(model)
    return head, FeatureBatches(body, loader)


def _prepare_ours(cfg: Config, model: nn.Module, loader: DataLoader) -> Prepare:
    from laplacefim import Laplace

    def prepare() -> Fit:
        la = Laplace(
            model,
            likelihood="classification",
            subset=cfg.subset,
            structure=cfg.structure,
            curvature=cfg.curvature,
            prior_precision=1.0,
            fisher_samples=1,
            max_full_params=25_000,  # W2's last layer has 20,490 (the default refuses it)
        )
        return lambda: la.fit(loader)

    return prepare


def _prepare_laplace(variant: str, cfg: Config, model: nn.Module, loader: DataLoader) -> Prepare:
    import laplace
    import laplace.curvature

    _, cls_name, kwargs = next(e for e in _LAPLACE_BACKENDS[cfg.curvature] if e[0] == variant)
    backend = getattr(laplace.curvature, cls_name)

    def prepare() -> Fit:
        la = laplace.Laplace(
            model,
            "classification",
            subset_of_weights=cfg.subset,
            hessian_structure=cfg.structure,
            backend=backend,
            backend_kwargs=dict(kwargs),
        )
        return lambda: la.fit(loader)

    return prepare


def _prepare_curvlinops(cfg: Config, model: nn.Sequential, loader: DataLoader) -> Prepare:
    import curvlinops

    net, data = _target(cfg, model, loader)
    params = [p for p in net.parameters() if p.requires_grad]
    loss_func = nn.CrossEntropyLoss(reduction="sum")
    n_data = len(loader.dataset)  # type: ignore[arg-type]

    def kronecker(cls_name: str) -> object:
        op = getattr(curvlinops, cls_name)(
            net,
            loss_func,
            params,
            data,
            fisher_type=_CURVLINOPS_KFAC[cfg.curvature],
            mc_samples=1,
            check_deterministic=False,
            num_data=n_data,
            separate_weight_and_bias=True,
        )
        op.compute_kronecker_factors()
        return op

    def fit_kron() -> object:
        return kronecker("KFACLinearOperator")

    def fit_ekfac() -> object:
        op = kronecker("EKFACLinearOperator")
        op.compute_eigenvalue_correction()
        return op

    def fit_full() -> object:
        cls = getattr(curvlinops, _CURVLINOPS_FULL[cfg.curvature])
        op = cls(net, loss_func, params, data, check_deterministic=False, num_data=n_data)
        return op @ torch.eye(op.shape[1])

    if cfg.structure == "kron":
        return lambda: fit_kron
    if cfg.structure == "ekfac":
        return lambda: fit_ekfac
    if cfg.structure == "full":
        return lambda: fit_full
    raise UnsupportedError(f"curvlinops has no exact {cfg.structure}")


def _backpack_accumulate(
    acc: list[Any] | None, params: list[nn.Parameter], attr: str, structure: str
) -> list[Any]:
    """Add this batch's BackPACK quantities (read from ``params``) to ``acc``."""
    if structure == "full":
        rows = [getattr(p, attr) for p in params]
        lead = 1 if attr == "grad_batch" else 2  # [N, *shape] or [C, N, *shape]
        V = torch.cat([r.reshape(*r.shape[:lead], -1).flatten(0, lead - 1) for r in rows], 1)
        gram = V.T @ V
        return [gram] if acc is None else [acc[0].add_(gram)]
    values = [getattr(p, attr) for p in params]
    if acc is None:
        return [[f.clone() for f in v] if structure == "kron" else v.clone() for v in values]
    for total, v in zip(acc, values, strict=True):
        if structure == "kron":
            for t, f in zip(total, v, strict=True):
                t.add_(f)
        else:
            total.add_(v)
    return acc


def _prepare_backpack(cfg: Config, model: nn.Sequential, loader: DataLoader) -> Prepare:
    import backpack
    import backpack.extensions

    entry = _BACKPACK.get((cfg.structure, cfg.curvature))
    if entry is None:
        raise UnsupportedError(f"BackPACK has no {cfg.structure} {cfg.curvature}")
    ext_name, ext_kwargs, attr = entry
    net, data = _target(cfg, copy.deepcopy(model), loader)
    net = backpack.extend(net)
    loss_func = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))
    params = [p for p in net.parameters() if p.requires_grad]

    def fit() -> object:
        extension = getattr(backpack.extensions, ext_name)(**ext_kwargs)
        acc: list[Any] | None = None
        for X, y in data:
            net.zero_grad()
            loss = loss_func(net(X), y)
            with backpack.backpack(extension):
                loss.backward()
            acc = _backpack_accumulate(acc, params, attr, cfg.structure)
        return acc

    return lambda: fit


def _prepare_asdl(cfg: Config, model: nn.Sequential, loader: DataLoader) -> Prepare:
    import asdl
    import torch.nn.functional as F

    net, data = _target(cfg, model, loader)
    if cfg.subset == "last_layer":
        # ASDL mistakes a bare Linear for a whole model holding a full-shape Fisher
        # ("ValueError: data do not exist"); a container around it avoids that.
        net = nn.Sequential(net)

    def prepare() -> Fit:
        config = asdl.FisherConfig(
            fisher_type=_ASDL_TYPES[cfg.curvature],
            fisher_shapes=[cfg.structure],
            loss_type=asdl.LOSS_CROSS_ENTROPY,
            n_mc_samples=1,
            data_size=1,
        )
        maker = asdl.get_fisher_maker(net, config)

        def fit() -> object:
            maker.zero_fisher()
            for X, y in data:
                dummy = maker.setup_model_call(net, X)
                maker.setup_loss_call(F.cross_entropy, dummy, y)
                maker.forward_and_backward(accumulate=True)
            return maker

        return fit

    return prepare


def _prepare_epoch(model: nn.Module, loader: DataLoader) -> Prepare:
    """One training-style epoch: forward, CE loss (sum), backward, for every batch."""

    def fit() -> object:
        for X, y in loader:
            model.zero_grad()
            nn.functional.cross_entropy(model(X), y, reduction="sum").backward()
        return None

    return lambda: fit


def make_prepare(
    lib: str, variant: str, cfg: Config | None, model: nn.Sequential, loader: DataLoader
) -> Prepare:
    """Return the prepare callable of ``lib``/``variant`` for ``cfg``."""
    if lib == "epoch":
        return _prepare_epoch(model, loader)
    assert cfg is not None
    if lib == "ours":
        return _prepare_ours(cfg, model, loader)
    if lib == "laplace":
        return _prepare_laplace(variant, cfg, model, loader)
    if lib == "curvlinops":
        return _prepare_curvlinops(cfg, model, loader)
    if lib == "backpack":
        return _prepare_backpack(cfg, model, loader)
    if lib == "asdl":
        return _prepare_asdl(cfg, model, loader)
    raise ValueError(f"unknown library {lib!r}")
