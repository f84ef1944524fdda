"""Reading what ``laplacefim evaluate`` is given: the model factory, its weights and the
data files, each checked with an error that says what was wrong and how to fix it."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn

from laplacefim import evaluation as ev


class CLIError(Exception):
    """A problem with the user's inputs; its message is printed without a traceback."""


def _import_module(module_spec: str, model_arg: str) -> ModuleType:
    """Import ``module_spec``: a path to a ``.py`` file or a dotted module name."""
    is_path = module_spec.endswith(".py") or "/" in module_spec or os.sep in module_spec
    if is_path:
        path = Path(module_spec)
        if not path.is_file():
            raise CLIError(f"--model {model_arg}: file not found: {module_spec!r}.")
        name = f"laplacefim_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise CLIError(f"--model {model_arg}: cannot load {module_spec!r} as a Python file.")
        module = importlib.util.module_from_spec(spec)
        folder = str(path.resolve().parent)
        if folder not in sys.path:  # let the file import its neighbours
            sys.path.insert(0, folder)
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            raise CLIError(
                f"--model {model_arg}: importing {module_spec!r} failed: "
                f"{type(error).__name__}: {error}"
            ) from error
        return module
    if os.getcwd() not in sys.path:  # a console script does not put the cwd on sys.path
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_spec)
    except ModuleNotFoundError as error:
        raise CLIError(
            f"--model {model_arg}: cannot import module {module_spec!r} ({error}). MODULE must "
            "be a dotted module importable from the current directory (e.g. mypkg.models) "
            "or a path to a .py file (e.g. ./models.py)."
        ) from error
    except Exception as error:
        raise CLIError(
            f"--model {model_arg}: importing {module_spec!r} failed: "
            f"{type(error).__name__}: {error}"
        ) from error


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model MODULE:FACTORY`` and ``--weights FILE.pt``, read by :func:`build_model` and
    :func:`load_weights`."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help="a function returning the untrained nn.Module; MODULE is a "
        "dotted module importable from the current directory or a "
        "path to a .py file",
    )
    parser.add_argument(
        "--weights",
        required=True,
        metavar="FILE.pt",
        help="the model's state_dict, saved with torch.save",
    )


def build_model(model_arg: str) -> nn.Module:
    """Import ``MODULE:FACTORY``, call the factory and check it returned an ``nn.Module``.

    Raises:
        CLIError: For a malformed argument, a module that cannot be imported, a missing or
            failing factory, or a factory that does not return an ``nn.Module``.
    """
    module_spec, sep, factory_name = model_arg.rpartition(":")
    if not sep or not module_spec or not factory_name or not factory_name.isidentifier():
        raise CLIError(
            f"--model must be MODULE:FACTORY (e.g. models.py:make_net or mypkg.models:make_net), "
            f"got {model_arg!r}."
        )
    module = _import_module(module_spec, model_arg)
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        available = sorted(
            n
            for n, v in vars(module).items()
            if callable(v)
            and not n.startswith("_")
            and getattr(v, "__module__", None) == module.__name__
        )
        what = "is not callable" if factory is not None else "is not defined"
        raise CLIError(
            f"--model {model_arg}: {factory_name!r} {what} in {module_spec!r}; "
            f"callables defined there: {available or 'none'}."
        )
    try:
        model = factory()
    except Exception as error:
        raise CLIError(
            f"--model {model_arg}: calling {factory_name}() failed: "
            f"{type(error).__name__}: {error}. The factory must take no arguments and return "
            "the untrained nn.Module."
        ) from error
    if not isinstance(model, nn.Module):
        raise CLIError(
            f"--model {model_arg}: {factory_name}() returned a {type(model).__name__}; it must "
            "return a torch.nn.Module (the architecture the weights belong to)."
        )
    return model


def _listing(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def load_weights(model: nn.Module, path: str, model_arg: str) -> None:
    """Load a ``state_dict`` file into ``model``, or say exactly why it does not fit.

    Raises:
        CLIError: For a file that is not a ``torch.save``'d state_dict, or keys or shapes
            that do not match the model.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CLIError(
            f"--weights {path}: cannot read it as a state_dict ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Save the weights with "
            "torch.save(model.state_dict(), path), not the whole model."
        ) from error
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise CLIError(
            f"--weights {path}: expected a state_dict (a mapping of parameter names to "
            f"tensors), got a {type(state).__name__}. Save it with "
            "torch.save(model.state_dict(), path)."
        )
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys (in the model, not in the file): {_listing(missing)}")
        if unexpected:
            problems.append(
                f"unexpected keys (in the file, not in the model): {_listing(unexpected)}"
            )
        if mismatched:
            problems.append(f"shape mismatches: {_listing(mismatched)}")
        hint = ""
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = " The file's keys start with 'module.': strip that prefix (DataParallel)."
        raise CLIError(
            f"--weights {path} do not fit the model built by {model_arg}: "
            + "; ".join(problems)
            + ". Save model.state_dict() of the same architecture the factory builds."
            + hint
        )
    model.load_state_dict(state)
    model.eval()


def _npz(path: str, flag: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise CLIError(
                    f"{flag} {path}: expected an .npz archive (np.savez), got a single array."
                )
            return {key: archive[key] for key in archive.files}
    except CLIError:
        raise
    except Exception as error:
        raise CLIError(
            f"{flag} {path}: cannot read it as an .npz archive ({type(error).__name__}: "
            f"{error}). Write it with numpy.savez(path, X_train=..., y_train=..., ...)."
        ) from error


def _inputs_array(
    arrays: Mapping[str, np.ndarray], key: str, flag: str, path: str, dtype: torch.dtype
) -> Tensor:
    if key not in arrays:
        raise CLIError(f"{flag} {path}: missing array {key!r}; it holds {sorted(arrays)}.")
    x = arrays[key]
    if x.dtype.kind not in "biuf":
        raise CLIError(f"{flag} {path}: {key} must hold numbers, got dtype {x.dtype}.")
    if x.ndim < 2 or len(x) == 0:
        raise CLIError(
            f"{flag} {path}: {key} must have shape (N, features...) with N >= 1, got {x.shape}."
        )
    if not np.isfinite(x).all():
        raise CLIError(f"{flag} {path}: {key} contains NaN or infinite values.")
    return torch.as_tensor(x).to(dtype)


def _targets(
    y: np.ndarray, key: str, likelihood: str, outputs: tuple[int, ...], n: int, path: str
) -> Tensor:
    where = f"--data {path}: {key}"
    if y.dtype.kind not in "biuf":
        raise CLIError(f"{where} must hold numbers, got dtype {y.dtype}.")
    if len(y) != n:
        raise CLIError(f"{where} has {len(y)} rows but its inputs have {n}.")
    if likelihood == "classification":
        if y.dtype.kind == "f":
            whole = bool(np.all(np.mod(y, 1) == 0))
            hint = (
                " They are whole numbers: save them with y.astype(np.int64)."
                if whole
                else " For real-valued targets use --likelihood regression."
            )
            raise CLIError(
                f"{where} has dtype {y.dtype}, but --likelihood classification "
                f"needs integer class labels.{hint}"
            )
        n_classes = outputs[-1] if len(outputs) == 2 else 0
        if len(outputs) != 2 or n_classes < 2:
            raise CLIError(
                f"--likelihood classification needs model outputs (B, C) with C >= 2, "
                f"got {outputs}; for one logit use --likelihood binary."
            )
        if y.ndim != 1:
            raise CLIError(f"{where} must be (N,) class labels, got shape {y.shape}.")
        if y.min() < 0 or y.max() >= n_classes:
            raise CLIError(
                f"{where} holds labels in [{y.min()}, {y.max()}], but the model has "
                f"{n_classes} outputs; labels must be in [0, {n_classes - 1}]."
            )
        return torch.as_tensor(y).long()
    if likelihood == "binary":
        if outputs[1:] not in ((), (1,)):
            raise CLIError(
                f"--likelihood binary needs one logit per input, model outputs (B,) "
                f"or (B, 1), got {outputs}; for several classes use classification."
            )
        if not np.isin(y, (0, 1)).all():
            raise CLIError(
                f"{where} must hold 0/1 targets for --likelihood binary, got values "
                f"{np.unique(y)[:5].tolist()}…; for real-valued targets use "
                "--likelihood regression."
            )
        return torch.as_tensor(y.astype(np.float32)).reshape(n, *outputs[1:])
    size = int(np.prod(outputs[1:], dtype=np.int64)) if len(outputs) > 1 else 1
    if y.size != n * size:
        raise CLIError(
            f"{where} has shape {y.shape}, but the model's outputs are "
            f"{('N', *outputs[1:])}; regression targets must match them."
        )
    if not np.isfinite(y).all():
        raise CLIError(f"{where} contains NaN or infinite values.")
    return torch.as_tensor(y.astype(np.float64)).reshape(n, *outputs[1:])


def load_data(path: str, model: nn.Module, likelihood: str) -> ev.EvalData:
    """Read and check X_train, y_train, X_test, y_test against the model and likelihood.

    Raises:
        CLIError: For missing arrays, wrong shapes or dtypes, inputs the model cannot take,
            or targets that do not fit the likelihood.
    """
    arrays = _npz(path, "--data")
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    missing = [k for k in ("X_train", "y_train", "X_test", "y_test") if k not in arrays]
    if missing:
        raise CLIError(
            f"--data {path}: missing arrays {missing}; it holds {sorted(arrays)}. "
            "Expected X_train, y_train, X_test, y_test."
        )
    x_train = _inputs_array(arrays, "X_train", "--data", path, dtype)
    x_test = _inputs_array(arrays, "X_test", "--data", path, dtype)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise CLIError(
            f"--data {path}: X_train is {tuple(x_train.shape)} but X_test is "
            f"{tuple(x_test.shape)}; their per-example shapes must agree."
        )
    try:
        with torch.no_grad():
            outputs = tuple(model(x_test[:2]).shape)
    except Exception as error:
        raise CLIError(
            f"the model fails on inputs shaped like X_test {tuple(x_test.shape)}: "
            f"{type(error).__name__}: {error}"
        ) from error
    y_train = _targets(arrays["y_train"], "y_train", likelihood, outputs, len(x_train), path)
    y_test = _targets(arrays["y_test"], "y_test", likelihood, outputs, len(x_test), path)
    if likelihood != "classification":
        y_train, y_test = y_train.to(dtype), y_test.to(dtype)
    return ev.EvalData(x_train, y_train, x_test, y_test)


def load_ood(path: str, data: ev.EvalData) -> Tensor:
    """Read the OOD inputs (array ``X``), shaped like the test inputs.

    Raises:
        CLIError: For a missing array ``X`` or another per-example shape than X_test.
    """
    arrays = _npz(path, "--ood")
    x = _inputs_array(arrays, "X", "--ood", path, data.x_test.dtype)
    if x.shape[1:] != data.x_test.shape[1:]:
        raise CLIError(
            f"--ood {path}: X is {tuple(x.shape)} but X_test is "
            f"{tuple(data.x_test.shape)}; their per-example shapes must agree."
        )
    return x
