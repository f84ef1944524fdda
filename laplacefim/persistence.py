"""Saving and loading a fit: tensors and plain values only, written atomically.

Functions of values: a state is made from a configuration, hyperparameters and a fitted
state, and restored into them for a given model (whose parameter names and shapes must
match; ``Laplace.load`` also checks the weights).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from laplacefim import checks
from laplacefim.config import CurvatureConfig, FitState, Hyperparameters
from laplacefim.layout import Layout
from laplacefim.likelihoods import make_likelihood
from laplacefim.structures import make_structure, restore_blocks, save_blocks
from laplacefim.subsets import select

FORMAT = "laplacefim.Laplace"
VERSION = 2


def options_of(config: CurvatureConfig, hyper: Hyperparameters) -> dict[str, Any]:
    """The options that define a fit, as plain values."""
    return {
        "likelihood": config.likelihood.name,
        "likelihood_options": dict(config.likelihood.options()),
        "structure": config.structure.name,
        "structure_options": dict(config.structure.options()),
        "curvature": config.kind.value,
        "kfac_approx": config.kfac_approx.value,
        "temperature": hyper.temperature,
        "fisher_samples": config.fisher_samples,
    }


def state_dict(
    config: CurvatureConfig,
    hyper: Hyperparameters,
    fit: FitState | None,
    abstention: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Options, prior, noise, the fitted statistics and the abstention rule (no model)."""
    state: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "options": options_of(config, hyper),
        "prior_precision": hyper.prior_precision.clone(),
        "sigma_noise": hyper.sigma_noise.clone(),
        "fit": None,
        "abstention": abstention,
    }
    if fit is not None:
        state["fit"] = {
            "names": list(fit.selection.names),
            "shapes": [list(p.shape) for p in fit.selection.params],
            "last_layer": fit.last_layer,
            "blocks": save_blocks(fit.curvature),
            "mean": fit.mean.clone(),
            "loss_stats": fit.loss_stats.clone(),
            "n_data": fit.n_data,
            "sigma_fit": fit.sigma_fit.clone(),
            "input_shape": None if fit.input_shape is None else list(fit.input_shape),
        }
    return state


def _mismatch(what: str, saved: object, here: object) -> ValueError:
    return ValueError(
        f"the saved state has {what} {saved!r} but this Laplace has {here!r}; build the "
        "Laplace with the same options (or use Laplace.load, which takes them from the file)."
    )


def check_format(state: dict[str, Any]) -> None:
    """Raise unless ``state`` is a state of this format and version."""
    if state.get("format") != FORMAT:
        raise ValueError(f"not a laplacefim Laplace state (format={state.get('format')!r}).")
    if state.get("version") != VERSION:
        raise ValueError(
            f"the state has format version {state.get('version')!r}; this laplacefim reads "
            f"version {VERSION}. Refit and save again."
        )


def restore(
    model: nn.Module, config: CurvatureConfig, hyper: Hyperparameters, state: dict[str, Any]
) -> tuple[Hyperparameters, FitState | None]:
    """The hyperparameters and fitted state saved in ``state``, checked against ``model``.

    Raises:
        ValueError: If the state was made for other options, another subset, or a model
            whose parameters have other shapes.
    """
    check_format(state)
    saved_options = state["options"]
    here = options_of(config, hyper)
    for key in ("likelihood", "likelihood_options", "structure", "structure_options", "curvature"):
        if saved_options[key] != here[key]:
            raise _mismatch(key, saved_options[key], here[key])
    saved = state["fit"]
    fit = None
    if saved is not None:
        named = dict(model.named_parameters())
        missing = [name for name in saved["names"] if name not in named]
        if missing:
            raise ValueError(f"the model has no parameters named {missing} from the saved state.")
        saved_last = saved["last_layer"] is not None
        if saved_last != (config.subset == "last_layer"):
            saved_subset = "last_layer" if saved_last else saved["names"]
            raise _mismatch("subset", saved_subset, config.subset)
        selection = select(model, config.subset, saved["last_layer"])
        if list(selection.names) != saved["names"]:
            raise _mismatch("the parameters", saved["names"], list(selection.names))
        shapes = [list(p.shape) for p in selection.params]
        if shapes != saved["shapes"]:
            raise _mismatch("parameter shapes", saved["shapes"], shapes)
        device = selection.params[0].device
        curvature = restore_blocks(
            [
                (name, spec, [t.to(device) for t in tensors])
                for name, spec, tensors in saved["blocks"]
            ]
        )
        if curvature.numel != selection.n_params:
            raise ValueError(
                f"the saved curvature covers {curvature.numel} parameters, the model's "
                f"selection {selection.n_params}; load it into the model it was fitted on."
            )
        mean = saved["mean"].to(device)
        shape = saved["input_shape"]
        fit = FitState(
            selection,
            saved["last_layer"],
            curvature,
            mean,
            saved["loss_stats"].to(device),
            int(saved["n_data"]),
            saved["sigma_fit"],
            Layout.of(selection, curvature.sizes),
            None if shape is None else tuple(shape),
        )
    prior = checks.hyperparameter(state["prior_precision"], "prior_precision", allow_zero=True)
    sigma = checks.hyperparameter(state["sigma_noise"], "sigma_noise", allow_zero=False)
    temperature = checks.number(saved_options["temperature"], "temperature", positive=True)
    if fit is not None:
        fit.layout.prior_structure(prior)
    return Hyperparameters(prior, sigma, temperature), fit


def save(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a state atomically: to a temporary file beside ``path``, then renamed over it."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def load(path: str | os.PathLike[str], map_location: Any = None) -> dict[str, Any]:
    """Read a state written by :func:`save` (tensors and plain values only)."""
    state = torch.load(Path(path), map_location=map_location, weights_only=True)
    check_format(state)
    return state


def laplace_arguments(state: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of the ``Laplace`` a state was saved from."""
    options = state["options"]
    fit = state["fit"]
    subset: Any = "all"
    if fit is not None:
        subset = "last_layer" if fit["last_layer"] is not None else list(fit["names"])
    return {
        "likelihood": make_likelihood(options["likelihood"], options["likelihood_options"]),
        "subset": subset,
        "structure": make_structure(options["structure"], options["structure_options"]),
        "curvature": options["curvature"],
        "fisher_samples": options["fisher_samples"],
        "kfac_approx": options["kfac_approx"],
    }


def check_weights(fit: FitState, path: object) -> None:
    """Raise unless the model's chosen parameters equal the saved mean (to rounding).

    Raises:
        ValueError: Naming the largest difference and the ways out.
    """
    difference = float(weights_difference(fit))
    tolerance = 8 * torch.finfo(fit.mean.dtype).eps * float(fit.mean.abs().max())
    if difference > tolerance:
        raise ValueError(
            f"the model's weights differ from the fitted mean saved in {str(path)!r} "
            f"(largest |θ - θ*| = {difference:.3g}); load the weights the posterior was "
            "fitted at into the model first, or pass strict=False (and weights_check='off') "
            "to use it anyway."
        )


def weights_difference(fit: FitState) -> Tensor:
    """Largest ``|θ − θ*|`` between the model's chosen parameters and the fitted mean."""
    return (fit.selection.flat().to(fit.mean) - fit.mean).abs().max()
