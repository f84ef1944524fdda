"""Independent dense float64 brute-force reference for the curvature tests.

Nothing here imports ``laplacefim``.  Everything is computed in the most direct
way available with ``torch.func`` (Jacobians, Hessians and per-sample gradients
of the negative log-likelihood itself) or with explicit per-datum loops, so that
it can serve as an oracle for the package's (faster, structured) code paths.

Conventions mirrored here (the contract the tests check):

* parameters are flattened in ``model.named_parameters()`` order, each tensor
  row-major;
* the NLL is summed over the data; for regression it is the Gaussian NLL
  ``0.5 * sum(((y - f) / sigma) ** 2) + const`` with ``sigma`` a scalar or one
  value per output;
* every curvature is written as ``sum_n J_n^T M_n J_n`` for some per-datum
  "middle" matrix ``M_n`` (C x C) on the model outputs: the loss Hessian
  ``Lambda_n`` for the GGN, ``r_n r_n^T`` with ``r_n = grad_f l_n`` for the
  empirical Fisher, and a Monte-Carlo average of ``r r^T`` over sampled labels
  for the MC Fisher (whose expectation is ``Lambda_n``);
* KFAC blocks are ``kron(G, A) / n`` for Linear/Conv2d weights, ``G`` for their
  biases, ``kron(A, G) / n`` for Embedding weights, and the exact diagonal for
  any other parameter, where ``G = sum_{n, t} J_{n,t}^T M_n J_{n,t}`` with
  ``J_{n,t}`` the Jacobian of the outputs of datum ``n`` w.r.t. the layer
  output at position ``t`` (this equals ``sum_{n,t,v} g_v g_v^T`` for any
  factorisation ``M_n = sum_v s_v s_v^T``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

LIKELIHOODS = ("classification", "regression", "binary")
STRUCTURES = ("full", "diag", "kron")
KINDS = ("ggn", "fisher", "empirical_fisher")


# --------------------------------------------------------------------------- #
# parameter selection and flattening
# --------------------------------------------------------------------------- #
def trainable_names(model: nn.Module) -> list[str]:
    """Names of all parameters that require grad, in ``named_parameters`` order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def last_linear_names(model: nn.Module, x: Tensor) -> list[str]:
    """Parameter names of the last ``nn.Linear`` executed in a forward pass on ``x``."""
    order: list[str] = []
    handles = []
    for prefix, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            handles.append(
                mod.register_forward_hook(lambda m, i, o, prefix=prefix: order.append(prefix))
            )
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise AssertionError("model executes no nn.Linear")
    prefix = order[-1]
    mod = model.get_submodule(prefix)
    names = [_join(prefix, n) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
    return names


def select_names(model: nn.Module, subset: object) -> list[str]:
    """Resolve a subset spec ("all", list of names, callable) into names, in model order."""
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if subset == "all":
            keep = True
        elif callable(subset):
            keep = bool(subset(name, p))
        else:
            keep = name in set(subset)  # type: ignore[arg-type]
        if keep:
            out.append(name)
    return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def flat_params(model: nn.Module, names: Sequence[str]) -> Tensor:
    """Concatenate the chosen parameters (row-major) in ``named_parameters`` order."""
    params = dict(model.named_parameters())
    order = [n for n, _ in model.named_parameters() if n in set(names)]
    assert len(order) == len(names), "unknown or duplicate names"
    return torch.cat([params[n].detach().reshape(-1) for n in order])


def param_slices(model: nn.Module, names: Sequence[str]) -> dict[str, slice]:
    """Where each chosen parameter lives in the flat vector."""
    slices = {}
    start = 0
    chosen = set(names)
    for n, p in model.named_parameters():
        if n in chosen:
            slices[n] = slice(start, start + p.numel())
            start += p.numel()
    return slices


def functional(model: nn.Module, names: Sequence[str]) -> Callable[[Tensor, Tensor], Tensor]:
    """``f(theta_flat, x)``: the model's output on a batch ``x`` as a function of theta."""
    params = dict(model.named_parameters())
    order = [n for n, _ in model.named_parameters() if n in set(names)]
    shapes = [params[n].shape for n in order]
    sizes = [params[n].numel() for n in order]

    def f(theta: Tensor, x: Tensor) -> Tensor:
        pieces = torch.split(theta, sizes)
        new = {n: t.reshape(s) for n, t, s in zip(order, pieces, shapes, strict=True)}
        return functional_call(model, new, (x,), strict=False)

    return f


def jacobian(model: nn.Module, names: Sequence[str], x: Tensor) -> Tensor:
    """Per-datum Jacobian of the outputs w.r.t. theta, shape (B, C, P)."""
    f = functional(model, names)
    theta = flat_params(model, names)

    def single(theta: Tensor, xn: Tensor) -> Tensor:
        return f(theta, xn.unsqueeze(0)).reshape(-1)

    return vmap(jacrev(single), in_dims=(None, 0))(theta, x)


def outputs(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        out = model(x)
    return out.reshape(out.shape[0], -1)


# --------------------------------------------------------------------------- #
# the per-sample negative log-likelihood and its derivatives w.r.t. outputs
# --------------------------------------------------------------------------- #
def _sigma_vec(sigma: float | Tensor, c: int, like: Tensor) -> Tensor:
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return s.expand(c) if s.ndim == 0 else s


def nll(likelihood: str, fn: Tensor, yn: Tensor, sigma: float | Tensor = 1.0) -> Tensor:
    """Negative log-likelihood of ONE datum: ``fn`` (C,), ``yn`` its target."""
    if likelihood == "classification":
        classes = torch.arange(fn.shape[-1], device=fn.device)
        onehot = (classes == yn).to(fn.dtype)
        return -(torch.log_softmax(fn, dim=-1) * onehot).sum()
    if likelihood == "regression":
        s = _sigma_vec(sigma, fn.shape[-1], fn)
        return (
            0.5 * (((yn - fn) / s) ** 2).sum()
            + torch.log(s).sum()
            + 0.5 * fn.shape[-1] * math.log(2 * math.pi)
        )
    if likelihood == "binary":
        z = fn.reshape(())
        return F.softplus(z) - yn * z
    raise ValueError(likelihood)


def _dummy_targets(likelihood: str, f: Tensor) -> Tensor:
    if likelihood == "classification":
        return torch.zeros(f.shape[0], dtype=torch.long, device=f.device)
    if likelihood == "regression":
        return torch.zeros_like(f)
    return torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)


def loss_hessian_outputs(
    likelihood: str, f: Tensor, sigma: float | Tensor = 1.0, y: Tensor | None = None
) -> Tensor:
    """Hessian of the per-sample NLL w.r.t. the outputs, (B, C, C), by ``torch.func.hessian``.

    For these likelihoods it does not depend on the target; a dummy target is used
    when ``y`` is None.
    """
    if y is None:
        y = _dummy_targets(likelihood, f)
    return vmap(hessian(lambda fn, yn: nll(likelihood, fn, yn, sigma)))(f, y)


def loss_grad_outputs(likelihood: str, f: Tensor, y: Tensor, sigma: float | Tensor = 1.0) -> Tensor:
    """Per-sample gradient of the NLL w.r.t. the outputs, (B, C)."""
    return vmap(grad(lambda fn, yn: nll(likelihood, fn, yn, sigma)))(f, y)


# --------------------------------------------------------------------------- #
# dense curvatures
# --------------------------------------------------------------------------- #
def dense_ggn(
    model: nn.Module, names: Sequence[str], x: Tensor, likelihood: str, sigma: float | Tensor = 1.0
) -> Tensor:
    """``sum_n J_n^T Lambda_n J_n`` (P, P)."""
    J = jacobian(model, names, x)
    lam = loss_hessian_outputs(likelihood, outputs(model, x), sigma)
    return torch.einsum("ncp,ncd,ndq->pq", J, lam, J)


def per_sample_grads(
    model: nn.Module,
    names: Sequence[str],
    x: Tensor,
    y: Tensor,
    likelihood: str,
    sigma: float | Tensor = 1.0,
) -> Tensor:
    """Per-sample gradients of the NLL w.r.t. theta, (B, P), via ``vmap(grad)``."""
    f = functional(model, names)
    theta = flat_params(model, names)

    def loss(theta: Tensor, xn: Tensor, yn: Tensor) -> Tensor:
        return nll(likelihood, f(theta, xn.unsqueeze(0)).reshape(-1), yn, sigma)

    return vmap(grad(loss), in_dims=(None, 0, 0))(theta, x, y)


def empirical_fisher(
    model: nn.Module,
    names: Sequence[str],
    x: Tensor,
    y: Tensor,
    likelihood: str,
    sigma: float | Tensor = 1.0,
) -> Tensor:
    """``sum_n g_n g_n^T`` with per-sample gradients of the NLL (true labels)."""
    g = per_sample_grads(model, names, x, y, likelihood, sigma)
    return g.T @ g


def predictive_moments(
    likelihood: str, f: Tensor, sigma: float | Tensor = 1.0
) -> list[tuple[Tensor, Tensor]] | Tensor:
    """The law of ``r = grad_f l(y~)`` for ``y~`` drawn from the model's predictive.

    For the discrete likelihoods: a list of (probabilities (B,), r values (B, C)),
    one entry per possible label.  For regression ``r ~ N(0, diag(1/sigma^2))``:
    the diagonal covariance (C,) is returned.
    """
    _B, C = f.shape
    if likelihood == "classification":
        p = torch.softmax(f, dim=-1)
        eye = torch.eye(C, dtype=f.dtype, device=f.device)
        return [(p[:, c], p - eye[c]) for c in range(C)]
    if likelihood == "binary":
        s = torch.sigmoid(f)
        return [(1 - s[:, 0], s - 0.0), (s[:, 0], s - 1.0)]
    return 1.0 / _sigma_vec(sigma, C, f) ** 2


# --------------------------------------------------------------------------- #
# structured curvature from per-datum middle matrices (full / diag / kron)
# --------------------------------------------------------------------------- #
class CurvatureReference:
    """Per-datum factors of a model on a fixed data set, computed naively.

    ``contributions(M, structure)`` returns the (N, P, P) per-datum terms of the
    structured curvature built from middle matrices ``M`` (N, C, C); their sum is
    the curvature.  Every structure is linear in each ``M_n``, which is what the
    exact Monte-Carlo variance below relies on.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        x: Tensor,
        likelihood: str,
        sigma: float | Tensor = 1.0,
    ):
        self.model = model
        self.names = list(names)
        self.x = x
        self.likelihood = likelihood
        self.sigma = sigma
        self.slices = param_slices(model, self.names)
        self.P = sum(s.stop - s.start for s in self.slices.values())
        self.J = jacobian(model, self.names, x)  # (N, C, P)
        self.f = outputs(model, x)  # (N, C)
        self.N, self.C = self.f.shape
        self.groups = self._kron_groups()
        self._per_datum_layer_factors()

    # ----- which parameters get Kronecker blocks ------------------------------
    def _kron_groups(self) -> list[dict]:
        chosen = set(self.names)
        groups = []
        for prefix, mod in self.model.named_modules():
            if not isinstance(mod, (nn.Linear, nn.Conv2d, nn.Embedding)):
                continue
            if isinstance(mod, nn.Conv2d):
                assert mod.groups == 1 and mod.padding_mode == "zeros"
            g = {"prefix": prefix, "module": mod, "weight": None, "bias": None}
            for pname in ("weight", "bias"):
                full = _join(prefix, pname)
                if full in chosen:
                    g[pname] = full
            if g["weight"] or g["bias"]:
                groups.append(g)
        return groups

    def _per_datum_layer_factors(self) -> None:
        """For every Kronecker module: A summed over data and positions, row count,
        and per datum the Jacobians J_{n,t} (T, C, d_out) of the outputs w.r.t. the
        layer's output at each position t.  One datum at a time, explicit loops."""
        for g in self.groups:
            mod = g["module"]
            A = None
            rows = 0
            Jts = []
            for n in range(self.N):
                xn = self.x[n : n + 1]
                store: dict[str, Tensor] = {}

                def capture(m, inp, out, store=store):
                    store["in"] = inp[0].detach()
                    store["shape"] = out.shape

                h = mod.register_forward_hook(capture)
                try:
                    with torch.no_grad():
                        self.model(xn)
                finally:
                    h.remove()
                delta = torch.zeros(
                    store["shape"],
                    dtype=self.x.dtype if self.x.is_floating_point() else self.f.dtype,
                    device=self.x.device,
                    requires_grad=True,
                )
                h = mod.register_forward_hook(lambda m, i, o, d=delta: o + d)
                try:
                    out = self.model(xn).reshape(-1)
                finally:
                    h.remove()
                rows_J = []
                for c in range(out.numel()):
                    (gc,) = torch.autograd.grad(out[c], delta, retain_graph=True, allow_unused=True)
                    rows_J.append(torch.zeros_like(delta) if gc is None else gc)
                Jz = torch.stack(rows_J)  # (C, 1, *out_shape)
                inp = store["in"]
                if isinstance(mod, nn.Linear):
                    a = inp.reshape(-1, inp.shape[-1])  # (T, d_in)
                    Jt = Jz.reshape(Jz.shape[0], -1, Jz.shape[-1]).permute(1, 0, 2)
                    a_outer = a.T @ a
                elif isinstance(mod, nn.Conv2d):
                    patches = F.unfold(
                        inp,
                        mod.kernel_size,
                        dilation=mod.dilation,
                        padding=mod.padding,
                        stride=mod.stride,
                    )  # (1, in*kh*kw, L)
                    a = patches[0].T  # (L, D)
                    Jt = Jz.reshape(Jz.shape[0], Jz.shape[2], -1).permute(2, 0, 1)  # (L, C, out)
                    a_outer = a.T @ a
                else:  # Embedding
                    idx = inp.reshape(-1)
                    a = F.one_hot(idx, mod.num_embeddings).to(self.f.dtype)  # (T, num)
                    Jt = Jz.reshape(Jz.shape[0], -1, Jz.shape[-1]).permute(1, 0, 2)
                    a_outer = a.T @ a  # diag(token counts)
                A = a_outer if A is None else A + a_outer
                rows += a.shape[0]
                Jts.append(Jt.detach())
            g["A"] = A.contiguous()
            g["rows"] = rows
            g["Jt"] = Jts

    # ----- middle matrices ------------------------------------------------------
    def middle_ggn(self) -> Tensor:
        return loss_hessian_outputs(self.likelihood, self.f, self.sigma)

    def middle_ef(self, y: Tensor) -> Tensor:
        r = loss_grad_outputs(self.likelihood, self.f, y, self.sigma)
        return r[:, :, None] * r[:, None, :]

    # ----- structured curvature -------------------------------------------------
    def contributions(self, M: Tensor, structure: str) -> Tensor:
        """Per-datum terms (N, P, P) of the curvature built from middle matrices M."""
        full = torch.einsum("ncp,ncd,ndq->npq", self.J, M, self.J)
        if structure == "full":
            return full
        diag = torch.diag_embed(torch.diagonal(full, dim1=-2, dim2=-1))
        if structure == "diag":
            return diag
        assert structure == "kron", structure
        out = diag.clone()  # exact diagonal for every parameter without a Kronecker rule
        for g in self.groups:
            mod = g["module"]
            rows = g["rows"]
            for n in range(self.N):
                Jt = g["Jt"][n]  # (T, C, d_out)
                Gn = torch.einsum("tco,cd,tdp->op", Jt, M[n], Jt).contiguous()
                if g["weight"]:
                    s = self.slices[g["weight"]]
                    if isinstance(mod, nn.Embedding):
                        blk = torch.kron(g["A"], Gn) / rows
                    else:
                        blk = torch.kron(Gn, g["A"]) / rows
                    out[n, s, s] = blk
                if g["bias"]:
                    s = self.slices[g["bias"]]
                    out[n, s, s] = Gn
        return out

    def curvature(self, M: Tensor, structure: str) -> Tensor:
        return self.contributions(M, structure).sum(0)

    def ggn(self, structure: str = "full") -> Tensor:
        return self.curvature(self.middle_ggn(), structure)

    def ef(self, y: Tensor, structure: str = "full") -> Tensor:
        return self.curvature(self.middle_ef(y), structure)

    def mc_fisher_variance(self, structure: str, samples: int) -> Tensor:
        """Exact entrywise variance (P, P) of the Monte-Carlo Fisher estimator that
        draws ``samples`` labels per datum from the model's predictive and averages
        ``r r^T`` (r = grad_f l(y~)).  Its mean is ``self.ggn(structure)``."""
        law = predictive_moments(self.likelihood, self.f, self.sigma)
        if isinstance(law, list):
            mean = 0.0
            second = 0.0
            for prob, r in law:
                V = self.contributions(r[:, :, None] * r[:, None, :], structure)
                mean = mean + prob[:, None, None] * V
                second = second + prob[:, None, None] * V**2
            var_n = (second - mean**2).clamp_min(0.0)
        else:
            # r ~ N(0, diag(D)): the entry r^T B r has variance 2 * sum_{cd} B_cd^2 D_c D_d
            D = law
            C = self.C
            var_n = torch.zeros(self.N, self.P, self.P, dtype=self.f.dtype, device=self.f.device)
            basis = {}
            for c in range(C):
                for d in range(C):
                    E = torch.zeros(self.N, C, C, dtype=self.f.dtype, device=self.f.device)
                    E[:, c, d] = 1.0
                    basis[c, d] = self.contributions(E, structure)
            for c in range(C):
                for d in range(C):
                    Bsym = 0.5 * (basis[c, d] + basis[d, c])
                    var_n = var_n + 2.0 * Bsym**2 * D[c] * D[d]
        return var_n.sum(0) / samples


def dense_kfac(
    model: nn.Module,
    names: Sequence[str],
    x: Tensor,
    likelihood: str,
    sigma: float | Tensor = 1.0,
    kind: str = "ggn",
    y: Tensor | None = None,
) -> Tensor:
    """Brute-force KFAC (block diagonal, dense (P, P)) for the GGN or the EF.

    For the MC Fisher, the expectation of its KFAC is the GGN's KFAC (G is linear in
    the per-datum middle matrices and A does not depend on the labels).
    """
    ref = CurvatureReference(model, names, x, likelihood, sigma)
    if kind in ("ggn", "fisher"):
        return ref.ggn("kron")
    assert y is not None
    return ref.ef(y, "kron")


def reference_curvature(
    model: nn.Module,
    names: Sequence[str],
    x: Tensor,
    y: Tensor,
    likelihood: str,
    structure: str,
    kind: str,
    sigma: float | Tensor = 1.0,
) -> Tensor:
    """Expected value of the package's F for (structure, kind). Full GGN and full EF
    come from the independent dense routines; diag/kron from ``CurvatureReference``."""
    if structure == "full":
        if kind == "empirical_fisher":
            return empirical_fisher(model, names, x, y, likelihood, sigma)
        return dense_ggn(model, names, x, likelihood, sigma)
    ref = CurvatureReference(model, names, x, likelihood, sigma)
    if kind == "empirical_fisher":
        return ref.ef(y, structure)
    return ref.ggn(structure)


# --------------------------------------------------------------------------- #
# small builders shared by the tests (float64, local generators only)
# --------------------------------------------------------------------------- #
DTYPE = torch.float64


def init_(model: nn.Module, gen: torch.Generator, scale: float = 0.8) -> nn.Module:
    """Overwrite every floating parameter with N(0, scale^2) draws from ``gen``."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def mlp(n_out: int, gen: torch.Generator, d_in: int = 4, hidden: int = 5) -> nn.Module:
    model = nn.Sequential(
        nn.Linear(d_in, hidden, dtype=DTYPE), nn.Tanh(), nn.Linear(hidden, n_out, dtype=DTYPE)
    )
    return init_(model, gen)


def targets(likelihood: str, n: int, n_out: int, gen: torch.Generator) -> Tensor:
    if likelihood == "classification":
        return torch.randint(0, n_out, (n,), generator=gen)
    if likelihood == "regression":
        return torch.randn(n, n_out, generator=gen, dtype=DTYPE)
    return torch.randint(0, 2, (n,), generator=gen).to(DTYPE)


def loader(x: Tensor, y: Tensor, batch_size: int = 5):
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


def loop_jacobian(model: nn.Module, names: Sequence[str], x: Tensor) -> Tensor:
    """Per-datum Jacobian (B, C, P), one datum at a time with ``torch.autograd.functional``
    (for modules whose kernels ``vmap`` cannot batch, such as fused recurrent layers)."""
    f = functional(model, names)
    theta = flat_params(model, names)
    rows = [
        torch.autograd.functional.jacobian(lambda t, xn=xn: f(t, xn[None]).reshape(-1), theta)
        for xn in x
    ]
    return torch.stack(rows)
