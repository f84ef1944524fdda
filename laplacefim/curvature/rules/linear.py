"""Dense-input layers: the weight gradient is ``Σ_t g_t a_tᵀ`` over positions ``t``.

``nn.Linear`` on ``(B, *, d_in)`` inputs (every leading position shares the weight),
``nn.Conv2d`` with ``groups=1`` (positions are the output pixels, inputs the unfolded
patches), and *transposed linear* layers computing ``x @ W + b`` with ``W (d_in, d_out)``
— HuggingFace's ``Conv1D`` in GPT-2 — recognised by behaviour, without importing their
library. A layer called several times per forward stacks its calls as more positions.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from laplacefim.curvature.hooks import Call
from laplacefim.curvature.rules.base import batched, check_batch_first
from laplacefim.curvature.rules.generic import generic_rows
from laplacefim.curvature.segments import Product, Segment, join
from laplacefim.curvature.segments.conv import conv_product
from laplacefim.curvature.segments.outputs import CurvatureProduct, SharedProduct
from laplacefim.likelihoods.base import OutputCurvature


def product_rows(
    module: nn.Module,
    inputs: Tensor,
    grads: Tensor,
    wanted: frozenset[str],
    transposed: bool = False,
) -> dict[str, list[Segment]]:
    """Segments of a ``weight`` (and ``bias``) used as ``Σ_t g_t a_tᵀ (+ b)``."""
    out: dict[str, list[Segment]] = {}
    shared: dict[object, Tensor] = {}
    if "weight" in wanted:
        out["weight"] = [Product(inputs, grads, transposed, shared)]
    if "bias" in wanted:
        out["bias"] = [Product(None, grads, False, shared)]
    return out


def output_product_rows(
    module: nn.Module,
    call: Call,
    wanted: frozenset[str],
    curvature: OutputCurvature | None,
    transposed: bool = False,
) -> dict[str, list[Segment]] | None:
    """A ``weight`` (and ``bias``) whose layer gives the model's ``(B, C)`` output, from
    the output curvature or, when None, the identity; None unless inputs are ``(B, d_in)``."""
    out = check_batch_first(module, call)
    x = batched(call.arg(0, "input"), call)
    if x.ndim != 2 or out.ndim != 2:
        return None
    segments: dict[str, list[Segment]] = {}
    scratch: dict[object, Tensor] = {}
    eye = None
    if curvature is None:
        eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
    for name, inputs in (("weight", x), ("bias", None)):
        if name not in wanted:
            continue
        flipped = transposed and inputs is not None
        segment: Segment
        if eye is not None:
            segment = SharedProduct(inputs, eye, out.shape[0], True, flipped)
        else:
            segment = CurvatureProduct(inputs, curvature, flipped, scratch)  # type: ignore[arg-type]
        segments[name] = [segment]
    return segments


def transposed_output_rows(
    module: nn.Module, call: Call, wanted: frozenset[str], curvature: OutputCurvature | None
) -> dict[str, list[Segment]] | None:
    """:func:`output_product_rows` of a layer computing ``x @ W + b``."""
    return output_product_rows(module, call, wanted, curvature, transposed=True)


def linear_rows(
    module: nn.Module, calls: list[Call], wanted: frozenset[str]
) -> dict[str, list[Segment]]:
    """``nn.Linear``: inputs ``(B, *, d_in)``, every leading position shares the weight."""
    a, g = _positions(module, calls)
    return product_rows(module, a, g, wanted)


def transposed_linear_rows(
    module: nn.Module, calls: list[Call], wanted: frozenset[str]
) -> dict[str, list[Segment]]:
    """``x @ W + b`` with ``W (d_in, d_out)``: the grid is stored transposed."""
    a, g = _positions(module, calls)
    return product_rows(module, a, g, wanted, transposed=True)


_TRANSPOSED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether a leaf module with a 2-D ``weight`` (and a ``bias``) computes ``x @ W + b``.

    Decided once per module by running it on a small random input.
    """
    if module in _TRANSPOSED:
        return _TRANSPOSED[module]
    params = dict(module.named_parameters(recurse=False))
    weight, bias = params.get("weight"), params.get("bias")
    found = False
    if (
        not list(module.children())
        and set(params) <= {"weight", "bias"}
        and weight is not None
        and weight.ndim == 2
        and (bias is None or bias.shape == (weight.shape[1],))
    ):
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(2, 3, weight.shape[0], generator=generator, dtype=torch.float64)
        x = probe.to(dtype=weight.dtype, device=weight.device)
        try:
            with torch.no_grad():
                out = module(x)
        except Exception:
            out = None
        if isinstance(out, Tensor):
            with torch.no_grad():
                expected = x @ weight + (0 if bias is None else bias)
            scale = float(expected.abs().max().clamp_min(1e-30))
            error = float((out - expected).abs().max()) if out.shape == expected.shape else 1e30
            found = error <= 1e-3 * scale
    _TRANSPOSED[module] = found
    return found


def _positions(module: nn.Module, calls: list[Call]) -> tuple[Tensor, Tensor]:
    """Inputs ``(B, T, d_in)`` and output gradients ``(V, B, T, d_out)`` of every call."""
    inputs, grads = [], []
    for call in calls:
        out = check_batch_first(module, call)
        x = batched(call.arg(0, "input"), call)
        if x.ndim < 2:
            raise ValueError(f"a linear layer got an unbatched input of shape {tuple(x.shape)}.")
        inputs.append(x.reshape(out.shape[0], -1, x.shape[-1]))
        g = call.grads[0]
        grads.append(g.reshape(g.shape[0], out.shape[0], -1, g.shape[-1]))
    return join(inputs, 1), join(grads, 2)


def conv2d_rows(
    module: nn.Module, calls: list[Call], wanted: frozenset[str]
) -> dict[str, list[Segment]]:
    """``nn.Conv2d`` with ``groups=1``: products over the unfolded patches (formed when
    needed, see :func:`conv_product`); other groupings are generic."""
    conv: nn.Conv2d = module  # type: ignore[assignment]
    if conv.groups != 1:
        return generic_rows(module, calls, wanted)
    images, grads = [], []
    for call in calls:
        check_batch_first(module, call)
        x = batched(call.arg(0, "input"), call)
        if x.ndim != 4:
            raise ValueError(f"nn.Conv2d needs batched (B, C, H, W) inputs, got {tuple(x.shape)}.")
        images.append(x)
        grads.append(call.grads[0].flatten(3).transpose(2, 3))
    g = join(grads, 2)
    shared: dict[object, Tensor] = {}
    out: dict[str, list[Segment]] = {}
    if "weight" in wanted:
        out["weight"] = [conv_product(conv, images, g, shared)]
    if "bias" in wanted:
        out["bias"] = [Product(None, g, False, shared)]
    return out
