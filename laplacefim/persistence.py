"""Saving and loading a fitted ``Laplace``: tensors and plain values only, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from laplacefim.fitting import FitState, layout_of
from laplacefim.subsets import select

if TYPE_CHECKING:
    from laplacefim.laplace import Laplace

FORMAT = "laplacefim.Laplace"
VERSION = 1


def state_dict(la: Laplace) -> dict[str, Any]:
    """The state of ``la``: options, prior, noise and the fitted statistics (no model)."""
    state: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "options": {
            "likelihood": la.likelihood.value,
            "structure": la.structure.value,
            "curvature": la.curvature_kind.value,
            "temperature": la.temperature,
            "fisher_samples": la.fisher_samples,
        },
        "prior_precision": la.prior_precision.clone(),
        "sigma_noise": la.sigma_noise.clone(),
        "fit": None,
    }
    fit = la._fit
    if fit is not None:
        state["fit"] = {
            "names": list(fit.selection.names),
            "shapes": [list(p.shape) for p in fit.selection.params],
            "last_layer": fit.last_layer,
            "curvature": [t.clone() for t in fit.curvature.state()],
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


def load_state_dict(la: Laplace, state: dict[str, Any]) -> None:
    """Restore a state from :func:`state_dict` into ``la``, checking that it fits.

    Raises:
        ValueError: If the state was made for other options, another subset, or a model
            whose parameters have other shapes.
    """
    if state.get("format") != FORMAT:
        raise ValueError(f"not a laplacefim Laplace state (format={state.get('format')!r}).")
    options = state["options"]
    for key, here in (
        ("likelihood", la.likelihood.value),
        ("structure", la.structure.value),
        ("curvature", la.curvature_kind.value),
    ):
        if options[key] != here:
            raise _mismatch(key, options[key], here)
    saved = state["fit"]
    fit = None
    if saved is not None:
        named = dict(la.model.named_parameters())
        missing = [name for name in saved["names"] if name not in named]
        if missing:
            raise ValueError(f"the model has no parameters named {missing} from the saved state.")
        saved_last = saved["last_layer"] is not None
        if saved_last != (la.subset == "last_layer"):
            saved_subset = "last_layer" if saved_last else saved["names"]
            raise _mismatch("subset", saved_subset, la.subset)
        selection = select(la.model, la.subset, saved["last_layer"])
        if list(selection.names) != saved["names"]:
            raise _mismatch("the parameters", saved["names"], list(selection.names))
        shapes = [list(p.shape) for p in selection.params]
        if shapes != saved["shapes"]:
            raise _mismatch("parameter shapes", saved["shapes"], shapes)
        engine = la._engine(selection)
        curvature = engine.zeros()
        tensors: list[Tensor] = saved["curvature"]
        if len(tensors) != len(curvature.state()) or any(
            t.shape != z.shape for t, z in zip(tensors, curvature.state(), strict=False)
        ):
            raise ValueError(
                "the saved curvature does not fit this model's parameters (different layer "
                "shapes or types); load it into the model it was fitted on."
            )
        for target, value in zip(curvature.state(), tensors, strict=True):
            target.copy_(value)
        mean = saved["mean"].to(curvature.state()[0])
        if mean.shape != (selection.n_params,):
            raise ValueError(
                f"the saved mean has shape {tuple(mean.shape)}, expected ({selection.n_params},)."
            )
        shape = saved["input_shape"]
        fit = FitState(
            selection,
            saved["last_layer"],
            curvature,
            mean,
            saved["loss_stats"].to(mean.device),
            int(saved["n_data"]),
            saved["sigma_fit"],
            layout_of(selection, la.structure),
            None if shape is None else tuple(shape),
        )
    before = (
        la._fit,
        la._eigens,
        la.temperature,
        la.fisher_samples,
        la.sigma_noise,
        la.prior_precision,
    )
    try:
        la._fit, la._eigens = fit, None
        la.temperature = float(options["temperature"])
        la.fisher_samples = int(options["fisher_samples"])
        la.sigma_noise = state["sigma_noise"]
        la.prior_precision = state["prior_precision"]
    except Exception:
        la._fit, la._eigens, la.temperature, la.fisher_samples = before[:4]
        la._sigma_noise, la._prior_precision = before[4:]
        raise


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
    return torch.load(Path(path), map_location=map_location, weights_only=True)
