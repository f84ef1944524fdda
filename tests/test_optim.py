"""Tests of the natural-gradient preconditioner (``laplacefim.optim.NaturalGradient``).

Every number is checked against an independent dense float64 computation: a Newton step
from ``torch.autograd.functional.hessian``, dense solves with the brute-force per-datum
curvatures of ``tests/reference.py``, or a moving average recomputed by hand. Randomness
comes from local ``torch.Generator`` objects only.
"""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from helpers import generator
from torch import Tensor, nn

from laplacefim import Laplace
from laplacefim.optim import NaturalGradient

DTYPE = torch.float64
# Solves of well-conditioned float64 systems of size <= 60 agree to ~1e-12; leave margin.
SOLVE_RTOL = 1e-9
SOLVE_ATOL = 1e-11


# --------------------------------------------------------------------------- helpers
def _data(n: int, d_in: int, n_out: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, d_in, generator=gen, dtype=DTYPE)
    y = torch.randint(0, n_out, (n,), generator=gen)
    return x, y


def _names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _flat_grad(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _backward_mean_nll(model: nn.Module, x: Tensor, y: Tensor, prior: float = 0.0, n: int = 1):
    """Batch-mean cross-entropy (plus ``½ P₀ ‖θ‖² / N``), backpropagated."""
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    if prior:
        loss = loss + 0.5 * prior * _flat_params_graph(model).square().sum() / n
    loss.backward()
    return loss.detach()


def _flat_params_graph(model: nn.Module) -> Tensor:
    return torch.cat([p.reshape(-1) for p in model.parameters()])


def _stat_tensors(ngd: NaturalGradient) -> list[Tensor]:
    assert ngd.statistics is not None
    return [t.clone() for t in ngd.statistics.state()]


# --------------------------------------------------------------------------- exact steps
def test_full_ggn_step_on_logistic_regression_is_the_newton_step():
    """One nn.Linear with softmax: the GGN is the Hessian, so lr=1 is one Newton step of
    Σ CE + ½ P₀ ‖θ‖² (the loss handed to the optimizer is the batch mean of that / N)."""
    gen = generator(20240611)
    n, d_in, n_out, prior = 40, 4, 3, 0.7
    x, y = _data(n, d_in, n_out, gen)
    model = ref.init_(nn.Linear(d_in, n_out, dtype=DTYPE), gen)
    theta0 = _flat(model)

    def objective(theta: Tensor) -> Tensor:
        w, b = theta[: n_out * d_in].reshape(n_out, d_in), theta[n_out * d_in :]
        return F.cross_entropy(x @ w.T + b, y, reduction="sum") + 0.5 * prior * theta.square().sum()

    hess = torch.autograd.functional.hessian(objective, theta0)
    grad = torch.func.grad(objective)(theta0)
    newton = theta0 - torch.linalg.solve(hess, grad)

    ngd = NaturalGradient(
        model,
        n_data=n,
        structure="full",
        curvature="ggn",
        damping=0.0,
        prior_precision=prior,
        lr=1.0,
    )
    _backward_mean_nll(model, x, y, prior, n)
    info = ngd.step(x, y)
    assert info.updated_statistics and info.decomposed and not info.skipped
    torch.testing.assert_close(_flat(model), newton, rtol=SOLVE_RTOL, atol=SOLVE_ATOL)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_preconditioned_gradient_is_a_dense_solve(structure: str):
    """diag: (diag(F̄) + s) d = g; kron: (KFAC(F̄) + s I) d = g, s = (P₀ + λ)/N, with F̄ the
    brute-force per-datum curvature of the batch (the first update sets the average)."""
    gen = generator(1)
    n, n_out, prior, damping = 24, 3, 0.5, 0.3
    model = ref.mlp(n_out, gen, d_in=4, hidden=5)
    x, y = _data(n, 4, n_out, gen)
    names = _names(model)
    f_bar = ref.CurvatureReference(model, names, x, "classification").ggn(structure) / n
    shift = (prior + damping) / n
    ngd = NaturalGradient(
        model,
        n_data=n,
        structure=structure,
        curvature="ggn",
        damping=damping,
        prior_precision=prior,
    )
    _backward_mean_nll(model, x, y)
    g = _flat_grad(model).clone()
    ngd.precondition(x, y)
    expected = torch.linalg.solve(f_bar + shift * torch.eye(len(g), dtype=DTYPE), g)
    torch.testing.assert_close(_flat_grad(model), expected, rtol=SOLVE_RTOL, atol=SOLVE_ATOL)
    # and the stored state is that per-datum curvature
    torch.testing.assert_close(ngd.statistics.to_dense(), f_bar, rtol=1e-10, atol=1e-12)


def test_full_structure_on_an_mlp_is_the_dense_ggn_solve():
    gen = generator(2)
    n, n_out = 30, 3
    model = ref.mlp(n_out, gen, d_in=3, hidden=4)
    x, y = _data(n, 3, n_out, gen)
    f_bar = ref.dense_ggn(model, _names(model), x, "classification") / n
    ngd = NaturalGradient(model, n_data=n, structure="full", curvature="ggn", damping=0.2)
    _backward_mean_nll(model, x, y)
    g = _flat_grad(model).clone()
    ngd.precondition(x, y)
    expected = torch.linalg.solve(f_bar + 0.2 / n * torch.eye(len(g), dtype=DTYPE), g)
    torch.testing.assert_close(_flat_grad(model), expected, rtol=SOLVE_RTOL, atol=SOLVE_ATOL)


# --------------------------------------------------------------------------- invariance
def _two_layer(gen: torch.Generator) -> nn.Module:
    return ref.init_(
        nn.Sequential(nn.Linear(3, 4, dtype=DTYPE), nn.Tanh(), nn.Linear(4, 3, dtype=DTYPE)),
        gen,
    )


class _Scaled(nn.Module):
    """The same function with the first layer's inputs scaled by c and weights by 1/c."""

    def __init__(self, model: nn.Module, c: float) -> None:
        super().__init__()
        self.c = c
        self.net = copy.deepcopy(model)
        with torch.no_grad():
            self.net[0].weight.div_(c)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.c * x)


def _output_change(model: nn.Module, x: Tensor, y: Tensor, lr: float, natural: bool) -> Tensor:
    before = model(x).detach()
    _backward_mean_nll(model, x, y)
    if natural:
        # damping 1e-9 / N against a per-datum Fisher whose smallest eigenvalue is ~1e-3:
        # its effect on the step is ~1e-6 relative, far below the tolerance used below.
        ngd = NaturalGradient(
            model, n_data=len(y), structure="full", curvature="ggn", damping=1e-9, lr=lr
        )
        ngd.step(x, y)
    else:
        torch.optim.SGD(model.parameters(), lr=lr).step()
    return model(x).detach() - before


def test_natural_gradient_step_is_invariant_to_rescaling_inputs():
    """Rescaling the first layer's inputs by c (weights by 1/c) is a linear
    reparametrisation θ' = Sθ; the full-Fisher step transforms as δθ' = S δθ, so the
    change of the outputs is the same. Plain SGD's step transforms as S⁻ᵀ and is not."""
    gen = generator(3)
    n, c, lr = 60, 10.0, 1e-3
    model = _two_layer(gen)
    x, y = _data(n, 3, 3, gen)
    scaled = _Scaled(model, c)
    torch.testing.assert_close(scaled(x), model(x))  # same function

    ng_a = _output_change(copy.deepcopy(model), x, y, lr, natural=True)
    ng_b = _output_change(copy.deepcopy(scaled), x, y, lr, natural=True)
    # The reparametrisation is linear in θ, so the equality is exact up to the damping
    # (relative ~1e-6) and rounding; 1e-4 relative to the size of the change is loose.
    scale = ng_a.abs().max()
    assert scale > 1e-6
    torch.testing.assert_close(ng_b, ng_a, rtol=0, atol=1e-4 * float(scale))

    sgd_a = _output_change(copy.deepcopy(model), x, y, lr, natural=False)
    sgd_b = _output_change(copy.deepcopy(scaled), x, y, lr, natural=False)
    # SGD scales the first layer's weight step by c² = 100 in function space: far apart.
    assert (sgd_b - sgd_a).abs().max() > 0.5 * sgd_a.abs().max()


# --------------------------------------------------------------------------- moving averages
def _batches(gen: torch.Generator, k: int, n: int = 8) -> list[tuple[Tensor, Tensor]]:
    return [_data(n + i, 4, 3, gen) for i in range(k)]  # different batch sizes on purpose


def test_ema_of_per_datum_diagonal_statistics():
    gen = generator(4)
    model = ref.mlp(3, gen)
    names = _names(model)
    decay = 0.7
    ngd = NaturalGradient(model, n_data=100, structure="diag", curvature="ggn", ema_decay=decay)
    expected = None
    for x, y in _batches(gen, 3):
        batch = torch.diagonal(
            ref.CurvatureReference(model, names, x, "classification").ggn("diag")
        )
        batch = batch / len(y)
        expected = batch if expected is None else decay * expected + (1 - decay) * batch
        _backward_mean_nll(model, x, y)
        ngd.precondition(x, y)  # no parameter change: the model stays fixed
        torch.testing.assert_close(ngd.statistics.diagonal(), expected, rtol=1e-10, atol=1e-12)
    assert ngd.n_updates == 3 and ngd.n_steps == 3


def test_ema_of_kronecker_factors_and_callable_decay():
    """KFAC keeps a moving average of each factor (and of the per-datum row count)."""
    gen = generator(5)
    model = ref.mlp(3, gen)
    decays = {1: 0.5, 2: 0.9}
    ngd = NaturalGradient(
        model, n_data=100, structure="kron", curvature="ggn", ema_decay=lambda s: decays[s]
    )
    first = ngd.statistics
    assert first is None
    a_ema = count_ema = None
    for step, (x, y) in enumerate(_batches(gen, 3)):
        a = x.T @ x / len(y)  # input factor of the first layer, per datum
        if a_ema is None:
            a_ema, count_ema = a, torch.tensor(1.0, dtype=DTYPE)
        else:
            d = decays[step]
            a_ema, count_ema = d * a_ema + (1 - d) * a, d * count_ema + (1 - d) * 1.0
        _backward_mean_nll(model, x, y)
        ngd.precondition(x, y)
        block = ngd.statistics.blocks[0]
        torch.testing.assert_close(block.second, a_ema, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(block.count, count_ema, rtol=1e-10, atol=1e-12)


def test_update_and_decompose_intervals():
    gen = generator(6)
    model = ref.mlp(3, gen)
    ngd = NaturalGradient(
        model,
        n_data=50,
        structure="diag",
        curvature="ggn",
        update_interval=2,
        decompose_interval=3,
    )
    x, y = _data(10, 4, 3, gen)
    updated, decomposed = [], []
    for _ in range(7):
        _backward_mean_nll(model, x, y)
        info = ngd.precondition(x, y)
        updated.append(info.updated_statistics)
        decomposed.append(info.decomposed)
    assert updated == [True, False, True, False, True, False, True]
    assert decomposed == [True, False, False, True, False, False, True]
    assert ngd.n_updates == 4 and ngd.n_steps == 7


@pytest.mark.parametrize(
    "structure",
    [
        "kron",
        "full",
        "diag",
    ],
)
def test_direction_uses_the_last_decomposition_between_decompositions(structure: str):
    """Statistics refreshed at step 1 are not used until the next decomposition."""
    gen = generator(7)
    model = ref.mlp(3, gen)
    names = _names(model)
    n_data, damping = 50, 0.4
    ngd = NaturalGradient(
        model,
        n_data=n_data,
        structure=structure,
        curvature="ggn",
        damping=damping,
        decompose_interval=5,
    )
    (x0, y0), (x1, y1) = _batches(gen, 2)
    _backward_mean_nll(model, x0, y0)
    ngd.precondition(x0, y0)
    stats0 = ref.reference_curvature(model, names, x0, y0, "classification", structure, "ggn")
    stats0 = stats0 / len(y0)
    _backward_mean_nll(model, x1, y1)
    g = _flat_grad(model).clone()
    info = ngd.precondition(x1, y1)
    assert info.updated_statistics and not info.decomposed
    expected = torch.linalg.solve(stats0 + damping / n_data * torch.eye(len(g), dtype=DTYPE), g)
    torch.testing.assert_close(_flat_grad(model), expected, rtol=SOLVE_RTOL, atol=SOLVE_ATOL)


def test_schedules_are_called_with_the_step():
    gen = generator(8)
    model = ref.mlp(3, gen)
    n_data = 20
    lrs, dampings = [], []

    def lr(step: int) -> float:
        lrs.append(step)
        return 0.1 / (1 + step)

    def damping(step: int) -> float:
        dampings.append(step)
        return 1.0 + step

    ngd = NaturalGradient(
        model,
        n_data=n_data,
        structure="diag",
        curvature="ggn",
        damping=damping,
        lr=lr,
        decompose_interval=1,
    )
    x, y = _data(10, 4, 3, gen)
    for step in range(3):
        _backward_mean_nll(model, x, y)
        g = _flat_grad(model).clone()
        theta = _flat(model)
        ngd.step(x, y)
        diag = ngd.statistics.diagonal()
        d = g / (diag + (1.0 + step) / n_data)
        torch.testing.assert_close(_flat_grad(model), d, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            _flat(model), theta - 0.1 / (1 + step) * d, rtol=1e-10, atol=1e-12
        )
    assert set(lrs) == {0, 1, 2} and set(dampings) == {0, 1, 2}


def test_kl_clip_scales_the_step():
    gen = generator(9)
    model = ref.mlp(3, gen)
    x, y = _data(12, 4, 3, gen)
    lr, kl_clip = 0.5, 1e-6
    plain = NaturalGradient(
        copy.deepcopy(model), n_data=12, structure="diag", lr=lr, curvature="ggn"
    )
    clipped = NaturalGradient(
        model, n_data=12, structure="diag", lr=lr, curvature="ggn", kl_clip=kl_clip
    )
    _backward_mean_nll(plain.model, x, y)
    g = _flat_grad(plain.model).clone()
    plain.precondition(x, y)
    d = _flat_grad(plain.model).clone()
    _backward_mean_nll(model, x, y)
    info = clipped.precondition(x, y)
    expected = min(1.0, (kl_clip / (lr**2 * float(d @ g))) ** 0.5)
    assert expected < 1  # the clip is active in this set-up
    assert info.kl_scale == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(_flat_grad(model), expected * d, rtol=1e-12, atol=1e-14)
    # a loose clip changes nothing
    loose = NaturalGradient(
        copy.deepcopy(plain.model), n_data=12, structure="diag", lr=lr, curvature="ggn", kl_clip=1e6
    )
    _backward_mean_nll(loose.model, x, y)
    assert loose.precondition(x, y).kl_scale == 1.0


@pytest.mark.parametrize(
    ("structure", "decompose_interval"),
    [
        ("diag", 1),
        ("kron", 1),
        ("diag", 10),
        ("kron", 10),
    ],
)
def test_state_dict_round_trip_reproduces_the_next_step(structure: str, decompose_interval: int):
    gen = generator(10)
    model = ref.mlp(3, gen)
    batches = _batches(gen, 4)
    options = dict(
        n_data=40,
        structure=structure,
        curvature="ggn",
        lr=0.3,
        ema_decay=0.8,
        decompose_interval=decompose_interval,
    )
    ngd = NaturalGradient(model, **options)
    for x, y in batches[:3]:
        _backward_mean_nll(model, x, y)
        ngd.step(x, y)
    twin = copy.deepcopy(model)
    restored = NaturalGradient(twin, **options)
    restored.load_state_dict(copy.deepcopy(ngd.state_dict()))
    assert restored.n_steps == ngd.n_steps and restored.n_updates == ngd.n_updates
    x, y = batches[3]
    for net, opt in ((model, ngd), (twin, restored)):
        _backward_mean_nll(net, x, y)
        opt.step(x, y)
    torch.testing.assert_close(_flat(twin), _flat(model), rtol=0, atol=0)


# --------------------------------------------------------------------------- bad input
def test_nonfinite_gradients_skip_leaves_statistics_unchanged():
    gen = generator(11)
    model = ref.mlp(3, gen)
    x, y = _data(10, 4, 3, gen)
    ngd = NaturalGradient(model, n_data=10, structure="kron", curvature="ggn", lr=0.1)
    _backward_mean_nll(model, x, y)
    ngd.step(x, y)
    before = _stat_tensors(ngd)
    theta = _flat(model)
    _backward_mean_nll(model, x, y)
    model[0].weight.grad[0, 0] = float("nan")
    info = ngd.step(x, y)
    assert info.skipped and not info.updated_statistics
    for p in model.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))
    for a, b in zip(_stat_tensors(ngd), before, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(_flat(model), theta)  # θ − lr·0


def test_nonfinite_gradients_raise():
    gen = generator(12)
    model = ref.mlp(3, gen)
    x, y = _data(10, 4, 3, gen)
    ngd = NaturalGradient(model, n_data=10, structure="diag", nonfinite="raise")
    _backward_mean_nll(model, x, y)
    model[2].bias.grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite"):
        ngd.precondition(x, y)


def test_optimizer_missing_parameters_is_refused():
    gen = generator(13)
    model = ref.mlp(3, gen)
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"2\.weight"):
        NaturalGradient(model, n_data=10, optimizer=opt)
    # a subset the optimizer covers is fine
    NaturalGradient(model, n_data=10, optimizer=opt, subset=["0.weight", "0.bias"])


def test_precondition_then_optimizer_step():
    """Used with a torch optimizer: SGD(lr) after precondition equals step() with lr."""
    gen = generator(14)
    model = ref.mlp(3, gen)
    twin = copy.deepcopy(model)
    x, y = _data(10, 4, 3, gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    a = NaturalGradient(model, n_data=10, structure="kron", curvature="ggn", optimizer=opt)
    b = NaturalGradient(twin, n_data=10, structure="kron", curvature="ggn", lr=0.2)
    for net, ngd in ((model, a), (twin, b)):
        _backward_mean_nll(net, x, y)
        if ngd is a:
            ngd.precondition(x, y)
            opt.step()
        else:
            ngd.step(x, y)
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=1e-12, atol=1e-14)


def test_state_of_another_model_or_structure_is_refused():
    gen = generator(15)
    model = ref.mlp(3, gen)
    x, y = _data(10, 4, 3, gen)
    ngd = NaturalGradient(model, n_data=10, structure="kron", curvature="ggn")
    _backward_mean_nll(model, x, y)
    ngd.precondition(x, y)
    state = ngd.state_dict()
    other = ref.mlp(3, gen, d_in=4, hidden=6)  # same names, other shapes
    with pytest.raises(ValueError):
        NaturalGradient(other, n_data=10, structure="kron", curvature="ggn").load_state_dict(state)
    deeper = ref.init_(nn.Sequential(nn.Linear(4, 3, dtype=DTYPE)), gen)  # other names
    with pytest.raises(ValueError, match="names"):
        NaturalGradient(deeper, n_data=10, structure="kron", curvature="ggn").load_state_dict(state)
    with pytest.raises(ValueError, match="structure"):
        NaturalGradient(model, n_data=10, structure="diag", curvature="ggn").load_state_dict(state)
    with pytest.raises(ValueError, match="names"):
        NaturalGradient(
            model, n_data=10, structure="kron", curvature="ggn", subset=["2.weight"]
        ).load_state_dict(state)


@pytest.mark.parametrize(
    ("option", "value", "valid"),
    [
        ("structure", "dense", ["kron", "diag", "full"]),
        ("curvature", "hessian", ["ggn", "fisher", "empirical_fisher"]),
        ("likelihood", "poisson", ["classification", "regression", "binary"]),
        ("nonfinite", "ignore", ["skip", "raise"]),
    ],
)
def test_unknown_options_list_valid_values(option: str, value: str, valid: list[str]):
    model = ref.mlp(3, generator(16))
    with pytest.raises(ValueError) as err:
        NaturalGradient(model, n_data=10, **{option: value})
    for v in valid:
        assert repr(v) in str(err.value)


@pytest.mark.parametrize(
    "options",
    [
        {"damping": -1.0},
        {"damping": float("nan")},
        {"lr": -0.1},
        {"prior_precision": -1.0},
        {"update_interval": 0},
        {"decompose_interval": 1.5},
        {"n_data": 0},
        {"subset": "last_layer"},
    ],
)
def test_bad_hyperparameters_are_refused(options: dict):
    model = ref.mlp(3, generator(17))
    kwargs = {"n_data": 10, **options}
    with pytest.raises(ValueError):
        NaturalGradient(model, **kwargs)


def test_step_without_lr_and_undefined_steps():
    gen = generator(18)
    model = ref.mlp(3, gen)
    x, y = _data(10, 4, 3, gen)
    ngd = NaturalGradient(model, n_data=10)
    _backward_mean_nll(model, x, y)
    with pytest.raises(ValueError, match="lr"):
        ngd.step(x, y)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="backward"):
        ngd.precondition(x, y)
    zero = NaturalGradient(model, n_data=10, damping=0.0, prior_precision=0.0)
    _backward_mean_nll(model, x, y)
    with pytest.raises(ValueError, match="damping"):
        zero.precondition(x, y)


# --------------------------------------------------------------------------- Laplace.finetune
def _map_objective(model: nn.Module, x: Tensor, y: Tensor, prior: float) -> float:
    with torch.no_grad():
        nll = F.cross_entropy(model(x), y, reduction="sum")
        return float(nll + 0.5 * prior * _flat(model).square().sum())


def _small_problem(seed: int):
    gen = generator(seed)
    n, d_in, n_out = 64, 4, 3
    x = torch.randn(n, d_in, generator=gen, dtype=DTYPE)
    w = torch.randn(d_in, n_out, generator=gen, dtype=DTYPE)
    y = (x @ w + 0.5 * torch.randn(n, n_out, generator=gen, dtype=DTYPE)).argmax(-1)
    model = ref.mlp(n_out, gen, d_in=d_in, hidden=6)
    # a few plain gradient steps: a partly trained model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return x, y, model


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_finetune_lowers_the_map_objective_and_refits(structure: str):
    x, y, model = _small_problem(19)
    prior = 1.0
    loader = ref.loader(x, y, batch_size=16)
    la = Laplace(model, "classification", structure=structure, prior_precision=prior).fit(loader)
    before = _map_objective(model, x, y, prior)
    la.finetune(loader, epochs=3, lr=0.2, damping=1.0)
    after = _map_objective(model, x, y, prior)
    assert after < before
    torch.testing.assert_close(la.mean, _flat(model), rtol=0, atol=0)
    la.predict(x[:3])  # the refitted posterior is usable


def test_finetune_without_refit_marks_the_posterior_stale():
    x, y, model = _small_problem(20)
    loader = ref.loader(x, y, batch_size=16)
    la = Laplace(model, "classification", structure="kron", prior_precision=1.0).fit(loader)
    la.finetune(loader, epochs=1, lr=0.3, refit=False)
    with pytest.raises(RuntimeError, match="stale"):
        la.predict(x[:3])
    with pytest.raises(RuntimeError, match="stale"):
        la.posterior_precision  # noqa: B018
    la.fit(loader)
    la.predict(x[:3])
    torch.testing.assert_close(la.mean, _flat(model), rtol=0, atol=0)


def test_set_statistics_starts_the_average_from_a_laplace_fit():
    x, y, model = _small_problem(21)
    n = len(y)
    loader = ref.loader(x, y, batch_size=16)
    la = Laplace(model, "classification", structure="kron", prior_precision=1.0).fit(loader)
    decay = 0.9
    ngd = NaturalGradient(model, n_data=n, structure="kron", curvature="ggn", ema_decay=decay)
    ngd.set_statistics(la.curvature, n)
    fitted = [t.clone() / n for t in la.curvature.state()]
    for a, b in zip(_stat_tensors(ngd), fitted, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert all(  # a copy: the fit is not changed by the moving average
        a.data_ptr() != b.data_ptr()
        for a, b in zip(ngd.statistics.state(), la.curvature.state(), strict=True)
    )
    xb, yb = x[:16], y[:16]
    fresh = NaturalGradient(copy.deepcopy(model), n_data=n, structure="kron", curvature="ggn")
    _backward_mean_nll(fresh.model, xb, yb)
    fresh.precondition(xb, yb)
    batch = _stat_tensors(fresh)
    _backward_mean_nll(model, xb, yb)
    ngd.precondition(xb, yb)  # the first call folds its batch into the fitted average
    for a, f, b in zip(_stat_tensors(ngd), fitted, batch, strict=True):
        torch.testing.assert_close(a, decay * f + (1 - decay) * b, rtol=1e-10, atol=1e-12)
    wrong = NaturalGradient(model, n_data=n, structure="diag", curvature="ggn")
    with pytest.raises(ValueError, match="layout"):
        wrong.set_statistics(la.curvature, n)
