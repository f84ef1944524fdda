"""Eigenvalues of the GGN / Hessian: block Lanczos, structure spectra, spectral density.

``top_eigenvalues`` runs the block Krylov solver of :mod:`laplacefim.linalg` on GGN- or
Hessian-vector products over the data. A block of ``b`` vectors costs one pass over the
data, so ``b`` products share the per-batch overhead. Ritz values converge at both ends of
the spectrum, so ``which="smallest"`` on the Hessian finds its most negative eigenvalues
from the same Krylov space as ``−H`` would.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from laplacefim import checks
from laplacefim.geometry.operator import CurvatureOperator, Matrix
from laplacefim.inputs import ModelIO
from laplacefim.likelihoods import LikelihoodModel
from laplacefim.linalg import Eigen, Which, block_krylov_eigen
from laplacefim.options import parse_option
from laplacefim.subsets import SubsetSpec

if TYPE_CHECKING:
    from laplacefim.laplace import Laplace


def top_eigenvalues(
    model: nn.Module,
    loader: Iterable[Any],
    likelihood: str | LikelihoodModel,
    k: int = 10,
    *,
    matrix: str | Matrix = "ggn",
    which: str | Which = "largest",
    tol: float = 1e-4,
    max_iter: int = 100,
    block_size: int | None = None,
    generator: torch.Generator | None = None,
    sigma_noise: float | Tensor = 1.0,
    subset: SubsetSpec = "all",
    io: ModelIO | None = None,
) -> Eigen:
    """The ``k`` largest (or smallest) eigenpairs of the GGN or the Hessian, matrix-free.

    Block Lanczos with full reorthogonalisation on GGN- or Hessian-vector products over
    the data (summed NLL). ``which="smallest"`` with ``matrix="hessian"`` gives the most
    negative eigenvalues (directions of negative curvature); on the GGN the smallest
    eigenvalues are clustered near 0 and converge slowly.

    Args:
        model: The model at the expansion point.
        loader: ``(inputs, targets)`` batches.
        likelihood: A registered likelihood name or instance.
        k: Number of eigenpairs.
        matrix: ``"ggn"`` or ``"hessian"``.
        which: ``"largest"`` or ``"smallest"``.
        tol: Relative residual tolerance ``‖Ay − λy‖ ≤ tol·|λ|max``.
        max_iter: Most passes over the data (each multiplies one block).
        block_size: Vectors per pass (default ``k``).
        generator: CPU generator for the random start.
        sigma_noise: Regression noise.
        subset: Which parameters.
        io: How batches are split and the model is called (mapping batches), as for
            :class:`~laplacefim.Laplace`.

    Returns:
        An :class:`Eigen` with eigenvalues ``(k,)`` and eigenvectors ``(k, P)``.

    Raises:
        ValueError: For ``k`` larger than the number of parameters or bad options.

    Example:
        >>> eig = top_eigenvalues(model, loader, "classification", k=5)
        >>> eig.eigenvalues  # (5,), largest first
    """
    matrix = parse_option(matrix, Matrix, "matrix")
    which = parse_option(which, Which, "which")
    k = checks.integer(k, "k")
    max_iter = checks.integer(max_iter, "max_iter")
    op = CurvatureOperator(model, loader, likelihood, sigma_noise=sigma_noise, subset=subset, io=io)
    if k > op.n_params:
        raise ValueError(f"k={k} exceeds the number of parameters P={op.n_params}.")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}.")
    b = checks.integer(block_size if block_size is not None else k, "block_size")
    return block_krylov_eigen(
        lambda v: op.matmat(matrix, v),
        op.n_params,
        k,
        which=which,
        tol=tol,
        max_iter=max_iter,
        block_size=b,
        dtype=op.dtype,
        device=op.device,
        generator=generator,
    )


def structure_eigenvalues(la: Laplace) -> Tensor:
    """All eigenvalues of a fitted Laplace's curvature ``F`` (sum over data), largest first.

    Each block's decomposition gives them (KFAC blocks: products of their factors'
    eigenvalues over the row count; diagonal blocks: their entries; dense blocks: ``eigh``);
    before temperature and prior.

    Args:
        la: A fitted :class:`~laplacefim.Laplace`.

    Returns:
        ``(P,)`` eigenvalues, sorted in descending order.

    Example:
        >>> structure_eigenvalues(la)[:10]  # compare with top_eigenvalues(...).eigenvalues
    """
    values = torch.cat([d.eigenvalues() for d in la.curvature.decompose()])
    return values.sort(descending=True).values


@dataclass(frozen=True)
class SpectralDensity:
    """A smoothed eigenvalue density from stochastic Lanczos quadrature.

    Attributes:
        grid: ``(G,)`` eigenvalue positions.
        density: ``(G,)`` density; it integrates to 1 over the real line (multiply by
            ``P`` for eigenvalues per unit).
        nodes: ``(n_probes, n_steps)`` Ritz values (quadrature nodes).
        weights: ``(n_probes, n_steps)`` quadrature weights (each row sums to 1).
        sigma: Width of the Gaussian kernel.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float


def lanczos_tridiagonal(
    matvec: Callable[[Tensor], Tensor], v0: Tensor, n_steps: int
) -> tuple[Tensor, Tensor]:
    """Lanczos with full reorthogonalisation from ``v0``: Ritz values and ``(e₁ᵀ sᵢ)²``."""
    basis = [v0 / v0.norm()]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    for step in range(n_steps):
        w = matvec(basis[-1])
        alpha = w @ basis[-1]
        alphas.append(alpha)
        if step == n_steps - 1:
            break
        q = torch.stack(basis)
        for _ in range(2):
            w = w - (q @ w) @ q
        beta = w.norm()
        if beta <= 1e3 * torch.finfo(w.dtype).eps * alpha.abs().clamp_min(1.0):
            break
        betas.append(beta)
        basis.append(w / beta)
    m = len(alphas)
    t = torch.diag(torch.stack(alphas).double())
    if m > 1:
        off = torch.stack(betas[: m - 1]).double()
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    theta, s = torch.linalg.eigh(t)
    return theta, s[0].square()


def spectral_density(
    model: nn.Module,
    loader: Iterable[Any],
    likelihood: str | LikelihoodModel,
    *,
    matrix: str | Matrix = "ggn",
    n_probes: int = 5,
    n_steps: int = 40,
    grid: Tensor | int = 400,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    sigma_noise: float | Tensor = 1.0,
    subset: SubsetSpec = "all",
    io: ModelIO | None = None,
) -> SpectralDensity:
    """Eigenvalue density by stochastic Lanczos quadrature with Gaussian smoothing.

    For each of ``n_probes`` random unit vectors ``v``, ``n_steps`` Lanczos steps give
    nodes ``θᵢ`` and weights ``wᵢ`` with ``vᵀ g(A) v ≈ Σ wᵢ g(θᵢ)``; the density is the
    average of ``Σ wᵢ N(x; θᵢ, σ²)``.

    Args:
        model: The model.
        loader: ``(inputs, targets)`` batches.
        likelihood: A registered likelihood name or instance.
        matrix: ``"ggn"`` or ``"hessian"``.
        n_probes: Random start vectors.
        n_steps: Lanczos steps (matrix-vector products) per probe.
        grid: Positions ``(G,)``, or a number of points spanning the nodes.
        sigma: Kernel width; default 1 % of the nodes' range.
        generator: CPU generator for the probes.
        sigma_noise: Regression noise.
        subset: Which parameters.
        io: How batches are split and the model is called (mapping batches), as for
            :class:`~laplacefim.Laplace`.

    Returns:
        A :class:`SpectralDensity`.

    Example:
        >>> sd = spectral_density(model, loader, "classification", n_probes=3)
        >>> plot_spectral_density(sd, "spectrum.png")
    """
    matrix = parse_option(matrix, Matrix, "matrix")
    n_probes = checks.integer(n_probes, "n_probes")
    n_steps = checks.integer(n_steps, "n_steps")
    op = CurvatureOperator(model, loader, likelihood, sigma_noise=sigma_noise, subset=subset, io=io)
    n_steps = min(n_steps, op.n_params)
    nodes = torch.zeros(n_probes, n_steps, dtype=torch.float64)
    weights = torch.zeros(n_probes, n_steps, dtype=torch.float64)
    for i in range(n_probes):
        v0 = torch.randn(op.n_params, dtype=op.dtype, generator=generator).to(op.device)
        theta, w = lanczos_tridiagonal(lambda v: op.matmat(matrix, v), v0, n_steps)
        nodes[i, : theta.numel()] = theta.cpu()
        weights[i, : w.numel()] = w.cpu()
    used = weights > 0
    low, high = float(nodes[used].min()), float(nodes[used].max())
    span = max(high - low, 1e-12 * max(abs(high), 1.0))
    width = float(sigma) if sigma is not None else 0.01 * span
    if not width > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}.")
    if isinstance(grid, int):
        grid_t = torch.linspace(low - 3 * width, high + 3 * width, grid, dtype=torch.float64)
    else:
        grid_t = grid.detach().to(torch.float64).cpu().reshape(-1)
    diff = (grid_t[:, None, None] - nodes[None]) / width
    kernel = torch.exp(-0.5 * diff.square()) / (width * math.sqrt(2 * math.pi))
    density = (kernel * weights[None]).sum(-1).mean(-1)
    return SpectralDensity(grid_t, density, nodes, weights, width)


def plot_spectral_density(
    result: SpectralDensity,
    path: str | os.PathLike[str],
    *,
    log_density: bool = True,
    title: str | None = None,
) -> None:
    """Plot a :class:`SpectralDensity` to an image file (matplotlib, imported lazily).

    Args:
        result: The density.
        path: Output file (``.png``, ``.pdf``, ...).
        log_density: Logarithmic density axis (the bulk near 0 dwarfs the outliers).
        title: Optional title.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    floor = float(result.density.max()) * 1e-8
    ax.plot(result.grid.numpy(), result.density.clamp_min(floor).numpy())
    if log_density:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
