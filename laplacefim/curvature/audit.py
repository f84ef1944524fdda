"""The exactness audit: on the first batch, every chosen parameter's per-sample gradients,
as the layer rules give them, are checked against autograd.

On a probe of the first few rows of the batch:

1. the model's output with the hooks on equals its output without them (hooks expand
   broadcast outputs; this proves the expansion changes nothing);
2. the output of the first row alone equals its output inside the batch (the model treats
   data independently, so per-datum gradients exist);
3. with a random cotangent on every row, the sum of each parameter's per-sample gradients
   equals autograd's gradient — a parameter used where no rule sees it (functionally by
   another module, shared with one) or counted twice fails here;
4. with a cotangent on the first row only, every other row's per-sample gradient is zero
   and the first row's equals autograd's — a layer whose leading dimension is not the
   batch fails here.

A failure raises ``ValueError`` naming the parameters and the ways out; a number the
engine cannot stand behind is never returned.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import Tensor, nn

from laplacefim.curvature.hooks import Call, run_recorded
from laplacefim.curvature.segments import Segment
from laplacefim.inputs import ModelIO, batch_size, take

PROBE_ROWS = 3
SEED = 20240611


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the checks for computations in ``dtype``."""
    if dtype == torch.float64:
        return 1e-8
    if dtype == torch.float32:
        return 2e-3
    return 5e-2


def _close(a: Tensor, b: Tensor, tol: float, floor: float = 0.0) -> bool:
    scale = max(float(a.norm()), float(b.norm()), torch.finfo(torch.float64).tiny)
    return float((a - b).norm()) <= tol * scale + floor


def _fail(message: str) -> ValueError:
    return ValueError(
        f"laplacefim cannot compute this model's curvature exactly: {message} Options: leave "
        "the named parameters out of the subset (subset=[...] or a callable), or register a "
        "layer rule for the module that uses them (see docs/architectures.md)."
    )


def audit(
    model: nn.Module,
    io: ModelIO,
    modules: Mapping[str, nn.Module],
    broadcast: Collection[str],
    clone: set[str],
    params: Sequence[tuple[str, nn.Parameter]],
    segments_of: Callable[[dict[str, list[Call]]], dict[str, list[Segment]]],
    x: object,
) -> None:
    """Check the layer rules against autograd on the first rows of ``x``.

    Args:
        model: The model.
        io: How to call it.
        modules: The watched modules, by name.
        broadcast: The watched modules whose outputs may be expanded over the batch.
        clone: The watched modules recorded through clones (grows as the engine's does).
        params: The chosen parameters, by name.
        segments_of: The engine's map from recorded calls (with gradients) to segments.
        x: A batch of inputs.

    Raises:
        ValueError: Naming every parameter whose curvature would not be exact.
    """
    rows = min(batch_size(x), PROBE_ROWS)
    probe = take(x, slice(0, rows), batch_size(x))
    with torch.no_grad():
        plain = io.call(model, probe).detach()
    try:
        f, recording = run_recorded(
            lambda: io.call(model, probe),
            modules,
            track_grad=True,
            batch=rows,
            broadcast=broadcast,
            clone=clone,
        )
    except RuntimeError as error:
        raise _fail(
            "watching its layers broke the model's forward pass. A layer that sees no input "
            "with the batch's rows and outputs a tensor with a leading dimension of 1 is taken "
            f"to be broadcast over the batch; here it is not ({error})."
        ) from error
    dtype = f.dtype
    tol = tolerance(dtype)
    if f.shape != plain.shape or not _close(f.detach(), plain, tol):
        raise _fail(
            "watching its layers changed the model's output. A layer whose output has a "
            "leading dimension of 1 is taken to be broadcast over the batch; here it is used "
            "otherwise."
        )
    if rows > 1:
        with torch.no_grad():
            alone = io.call(model, take(probe, slice(0, 1), rows)).detach()
        if alone.shape != plain[:1].shape or not _close(alone, plain[:1], tol):
            raise _fail(
                "the output of a datum depends on the other data in its batch (in eval mode), "
                "so per-datum curvature does not exist."
            )
    generator = torch.Generator().manual_seed(SEED)
    noise = torch.randn((2, *f.shape), generator=generator, dtype=torch.float64)
    cols = noise.to(dtype=dtype, device=f.device)
    cols[1, 1:] = 0
    calls = recording.calls
    outputs = [o for cs in calls.values() for c in cs for o in c.outputs if o.requires_grad]
    # Two plain backward passes, not ``is_grads_batched``: vmap lacks batching rules for
    # some operations (custom autograd functions among them).
    inputs = [*outputs, *(p for _, p in params)]
    passes = [
        torch.autograd.grad(f, inputs, col, retain_graph=True, allow_unused=True) for col in cols
    ]
    found = [
        None if parts[0] is None else torch.stack(parts) for parts in zip(*passes, strict=True)
    ]
    index = 0
    for cs in calls.values():
        for call in cs:
            call.grads = []
            for out in call.outputs:
                g = found[index] if out.requires_grad else None
                index += int(out.requires_grad)
                call.grads.append(out.new_zeros(2, *out.shape) if g is None else g.detach())
    segments = segments_of(calls)
    # Gradients at the rounding level of the whole gradient (a key bias under softmax,
    # whose exact gradient is zero) are compared on that scale, not on their own.
    norms = [g.reshape(2, -1).double().norm(dim=1) for g in found[index:] if g is not None]
    total = torch.stack(norms).norm(dim=0) if norms else torch.zeros(2, dtype=torch.float64)
    floor = (1e3 * torch.finfo(dtype).eps * total).tolist()
    problems = []
    for (name, param), true in zip(params, found[index:], strict=True):
        expected = (
            torch.zeros(2, param.numel(), dtype=torch.float64, device=f.device)
            if true is None
            else true.reshape(2, -1).double()
        )
        parts = segments.get(name)
        if parts is None:
            per_sample = expected.new_zeros(2, rows, param.numel())
        else:
            per_sample = torch.cat([s.per_sample() for s in parts], dim=2).double()
        problem = _diagnose(per_sample, expected, tol, floor)
        if problem:
            problems.append(f"{name!r} ({problem})")
    if problems:
        raise _fail("for " + "; ".join(problems) + ".")


def _diagnose(per_sample: Tensor, expected: Tensor, tol: float, floor: list[float]) -> str | None:
    total = per_sample[0].sum(0)
    if not _close(total, expected[0], tol, floor[0]):
        if float(total.norm()) == 0.0:
            return (
                "the loss depends on it but no layer rule sees it used: it is used outside its "
                "module's forward, functionally by another module"
            )
        relative = float((total - expected[0]).norm()) / max(float(expected[0].norm()), 1e-300)
        return (
            f"the layer rules' gradient differs from autograd's by {relative:.2g} relative: "
            "it is shared with a module the rules do not see, or used in a way its rule "
            "does not describe"
        )
    leak = per_sample[1, 1:]
    if leak.numel() and float(leak.norm()) > tol * float(expected[1].norm()) + floor[1]:
        return (
            "its layer mixes the data of a batch: the leading dimension of the layer's "
            "output is not the batch (use batch_first=True or a batch-first layout)"
        )
    if not _close(per_sample[1, 0], expected[1], tol, floor[1]):
        return "its per-datum gradients differ from autograd's"
    return None
