"""Block Krylov eigen-solver for symmetric operators, in two forms.

:func:`krylov_steps` is a generator: it yields the block of vectors to multiply next and
receives the product, so that a caller whose products are passes over a data set (the
low-rank structure, summing a pass's statistics across ranks) can drive it one pass at a
time; :func:`block_krylov_eigen` drives it with a matrix-product function.

The method is a block Lanczos with full reorthogonalisation and Rayleigh–Ritz on the
stored products (the projected matrix ``T = Qᵀ(AQ)`` is formed explicitly, which stays
accurate in floating point). Ritz values converge at both ends of the spectrum.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor


class Which(str, Enum):
    """Which end of the spectrum."""

    LARGEST = "largest"
    SMALLEST = "smallest"


@dataclass(frozen=True)
class Eigen:
    """Extreme eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)``, largest first (``which="largest"``) or smallest first.
        eigenvectors: ``(k, P)`` orthonormal rows.
        residuals: ``(k,)`` residual norms ``‖A y − λ y‖`` of the returned pairs.
        n_products: Matrix-vector products used.
        converged: Whether every residual met the tolerance.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    n_products: int
    converged: bool


def _orthonormal_complement(
    z: Tensor, basis: Tensor | None, generator: torch.Generator | None
) -> Tensor:
    """Rows of ``z`` orthogonalised (twice) against ``basis`` and each other; rank-safe."""
    for _ in range(2):
        if basis is not None:
            z = z - (z @ basis.T) @ basis
    norms = z.norm(dim=1)
    scale = norms.max().clamp_min(torch.finfo(z.dtype).tiny)
    dead = norms <= 1e3 * torch.finfo(z.dtype).eps * scale
    if bool(dead.any()):  # an invariant subspace was found: continue with fresh directions
        fresh = torch.randn(
            (int(dead.sum()), z.shape[1]), dtype=z.dtype, device="cpu", generator=generator
        ).to(z.device)
        z = z.clone()
        z[dead] = fresh
        for _ in range(2):
            if basis is not None:
                z = z - (z @ basis.T) @ basis
    q, _ = torch.linalg.qr(z.T)
    q = q.T
    if basis is not None:
        q = q - (q @ basis.T) @ basis
        q, _ = torch.linalg.qr(q.T)
        q = q.T
    return q


def krylov_steps(
    n: int,
    k: int,
    *,
    which: Which,
    tol: float,
    max_iter: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
    start: Tensor | None = None,
) -> Generator[Tensor, Tensor, Eigen]:
    """Extreme eigenpairs of a symmetric ``(n, n)`` operator, one block product at a time.

    Yields blocks ``V (b, n)`` and expects ``A V`` row-wise in return (``send``); returns
    the :class:`Eigen` (as ``StopIteration.value``). Converged when every one of the ``k``
    Ritz pairs has ``‖A y − θ y‖ ≤ tol · |θ|max``.

    Args:
        n: Dimension.
        k: Number of eigenpairs.
        which: Largest or smallest end.
        tol: Relative residual tolerance.
        max_iter: Most block products.
        block_size: Vectors per product.
        dtype: Working dtype.
        device: Working device.
        generator: For the random start (CPU generator).
        start: Optional start rows ``(s, n)`` (for example last time's eigenvectors).
    """
    b = min(block_size, n)
    z = torch.randn((b, n), dtype=dtype, generator=generator).to(device)
    if start is not None:
        s = start.to(dtype=dtype, device=device)[:b]
        z[: s.shape[0]] = s
    q = _orthonormal_complement(z, None, generator)
    qs: list[Tensor] = []
    ws: list[Tensor] = []
    n_products = 0
    result: Eigen | None = None
    for _ in range(max_iter):
        w = yield q
        n_products += q.shape[0]
        qs.append(q)
        ws.append(w)
        basis, images = torch.cat(qs), torch.cat(ws)
        t = basis @ images.T
        t = 0.5 * (t + t.T)
        theta, s = torch.linalg.eigh(t.double())
        order = theta.argsort(descending=which is Which.LARGEST)[: min(k, theta.numel())]
        theta, s = theta[order], s[:, order].to(dtype)
        y = s.T @ basis
        r = s.T @ images - theta.to(dtype)[:, None] * y
        residuals = r.norm(dim=1)
        top = theta.abs().max().clamp_min(torch.finfo(dtype).tiny)
        converged = theta.numel() == k and bool((residuals <= tol * top.to(dtype)).all())
        result = Eigen(theta.to(dtype), y, residuals, n_products, converged)
        if converged:
            break
        if basis.shape[0] >= n:  # the whole space: the Ritz pairs are exact
            result = Eigen(theta.to(dtype), y, residuals, n_products, theta.numel() == k)
            break
        q = _orthonormal_complement(w[: n - basis.shape[0]], basis, generator)
    if result is None:  # max_iter >= 1 always produces a result
        raise RuntimeError("the eigen-solver ran no iteration.")
    return result


def block_krylov_eigen(
    matmat: Callable[[Tensor], Tensor],
    n: int,
    k: int,
    *,
    which: Which,
    tol: float,
    max_iter: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
    start: Tensor | None = None,
) -> Eigen:
    """Extreme eigenpairs of a symmetric operator given by ``matmat`` on rows ``(b, n)``.

    See :func:`krylov_steps` for the arguments.
    """
    steps = krylov_steps(
        n,
        k,
        which=which,
        tol=tol,
        max_iter=max_iter,
        block_size=block_size,
        dtype=dtype,
        device=device,
        generator=generator,
        start=start,
    )
    block = next(steps)
    while True:
        try:
            block = steps.send(matmat(block))
        except StopIteration as done:
            return done.value
