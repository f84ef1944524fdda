"""Curvature on specific architectures and options, plus bad-input handling.

All models and data are float64 and seeded through local generators only; the
expected matrices come from ``reference.py`` (never from laplacefim).
"""

from __future__ import annotations

import copy
import re

import pytest
import reference as ref
import torch
from helpers import REFERENCE_STRUCTURES, assert_close, generator
from torch import nn

laplacefim = pytest.importorskip("laplacefim")
Laplace = laplacefim.Laplace

RTOL = 1e-10
STRUCTURES = list(REFERENCE_STRUCTURES)


def fit_dense(
    model, x, y, likelihood="classification", structure="full", kind="ggn", batch_size=5, **kw
):
    kw.setdefault("prior_precision", 0.0)
    la = Laplace(model, likelihood=likelihood, structure=structure, curvature=kind, **kw)
    la.fit(ref.loader(x, y, batch_size), progress=False)
    return la, la.posterior_precision.to_dense().detach().to(ref.DTYPE)


# --------------------------------------------------------------------------- #
# models
# --------------------------------------------------------------------------- #
def cnn(g):
    model = nn.Sequential(
        nn.Conv2d(1, 2, 2, padding=1, dtype=ref.DTYPE),
        nn.Tanh(),
        nn.Conv2d(2, 2, 2, stride=2, dtype=ref.DTYPE),
        nn.Flatten(),
        nn.Linear(8, 3, dtype=ref.DTYPE),
    )
    return ref.init_(model, g, 0.6)


class EmbedNet(nn.Module):
    def __init__(self, head: str, seq: int = 4):
        super().__init__()
        self.emb = nn.Embedding(6, 3, dtype=ref.DTYPE)
        self.head_kind = head
        self.out = nn.Linear(3 if head == "mean" else 3 * seq, 2, dtype=ref.DTYPE)

    def forward(self, idx):
        e = self.emb(idx)
        e = e.mean(1) if self.head_kind == "mean" else e.flatten(1)
        return self.out(torch.tanh(e))


class NormNet(nn.Module):
    """Linear -> LayerNorm -> raw scale Parameter -> tanh -> Linear."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5, dtype=ref.DTYPE)
        self.norm = nn.LayerNorm(5, dtype=ref.DTYPE)
        self.scale = nn.Parameter(torch.ones(5, dtype=ref.DTYPE))
        self.out = nn.Linear(5, 3, dtype=ref.DTYPE)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x)) * self.scale))


class SeqNet(nn.Module):
    """A Linear applied to (B, T, d) inputs (T positions), then a flattening head."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 4, dtype=ref.DTYPE)
        self.head = nn.Linear(8, 3, dtype=ref.DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)).flatten(1))


class HeadFirst(nn.Module):
    """The head is *registered* first but *executed* last; its output is then doubled
    and reshaped, so the last executed Linear is not the model's final op."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(5, 3, dtype=ref.DTYPE)
        self.body = nn.Linear(4, 5, dtype=ref.DTYPE)

    def forward(self, x):
        out = self.head(torch.tanh(self.body(x))) * 2.0
        return out.reshape(x.shape[0], 3, 1).squeeze(-1)


def _cls_data(n, d, c, g):
    return torch.randn(n, d, generator=g, dtype=ref.DTYPE), torch.randint(0, c, (n,), generator=g)


# --------------------------------------------------------------------------- #
# architectures
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_conv2d(structure, kind):
    g = generator(1)
    model = cnn(g)
    x = torch.randn(7, 1, 3, 3, generator=g, dtype=ref.DTYPE)
    y = torch.randint(0, 3, (7,), generator=g)
    names = ref.trainable_names(model)
    expected = ref.reference_curvature(model, names, x, y, "classification", structure, kind)
    _, F = fit_dense(model, x, y, structure=structure, kind=kind, batch_size=3)
    assert_close(F, expected, RTOL)


@pytest.mark.parametrize("head", ["mean", "flatten"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_embedding(structure, head):
    g = generator(2)
    model = ref.init_(EmbedNet(head), g)
    idx = torch.randint(0, 6, (7, 4), generator=g)
    idx[0] = torch.tensor([1, 1, 2, 1])  # a token repeated inside one sample
    idx[1] = torch.tensor([5, 0, 5, 3])
    y = torch.randint(0, 2, (7,), generator=g)
    names = ref.trainable_names(model)
    for kind in ("ggn", "empirical_fisher"):
        expected = ref.reference_curvature(model, names, idx, y, "classification", structure, kind)
        _, F = fit_dense(model, idx, y, structure=structure, kind=kind, batch_size=3)
        assert_close(F, expected, RTOL)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_layernorm_and_raw_parameter(structure):
    """kron: LayerNorm weight/bias and the raw Parameter get their exact diagonal."""
    g = generator(3)
    model = ref.init_(NormNet(), g)
    x, y = _cls_data(9, 4, 3, g)
    names = ref.trainable_names(model)
    for kind in ("ggn", "empirical_fisher"):
        expected = ref.reference_curvature(model, names, x, y, "classification", structure, kind)
        _la, F = fit_dense(model, x, y, structure=structure, kind=kind)
        assert_close(F, expected, RTOL)
    if structure == "kron":
        s = ref.param_slices(model, names)
        full = ref.dense_ggn(model, names, x, "classification")
        _, F = fit_dense(model, x, y, structure="kron")
        for n in ("norm.weight", "norm.bias", "scale"):
            assert_close(F[s[n], s[n]], torch.diag(full[s[n], s[n]].diagonal()), RTOL)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_linear_with_positions(structure):
    """Linear on (B, T, d): A and G sum over data and positions, n = B * T."""
    g = generator(4)
    model = ref.init_(SeqNet(), g)
    x = torch.randn(7, 2, 3, generator=g, dtype=ref.DTYPE)
    y = torch.randint(0, 3, (7,), generator=g)
    names = ref.trainable_names(model)
    expected = ref.reference_curvature(model, names, x, y, "classification", structure, "ggn")
    _, F = fit_dense(model, x, y, structure=structure, batch_size=3)
    assert_close(F, expected, RTOL)


# --------------------------------------------------------------------------- #
# parameter selection
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("structure", STRUCTURES)
def test_frozen_parameters_left_out(structure):
    g = generator(5)
    model = ref.mlp(3, g)
    model[0].weight.requires_grad_(False)
    x, y = _cls_data(8, 4, 3, g)
    names = ref.trainable_names(model)
    assert names == ["0.bias", "2.weight", "2.bias"]
    expected = ref.reference_curvature(model, names, x, y, "classification", structure, "ggn")
    la, F = fit_dense(model, x, y, structure=structure)
    assert la.n_params == 5 + 15 + 3
    assert torch.equal(la.mean.detach().to(ref.DTYPE), ref.flat_params(model, names))
    assert_close(F, expected, RTOL)
    # naming a frozen parameter explicitly is an error that names it, not a silent drop
    with pytest.raises(ValueError, match=r"frozen parameters.*\['0\.weight'\]"):
        fit_dense(model, x, y, structure=structure, subset=["0.weight", "2.bias"])


@pytest.mark.parametrize("structure", STRUCTURES)
def test_subset_list_and_callable(structure):
    g = generator(6)
    model = ref.mlp(3, g)
    x, y = _cls_data(8, 4, 3, g)
    # listed out of model order: the flat order is still named_parameters() order
    la, F = fit_dense(model, x, y, structure=structure, subset=["2.weight", "0.bias"])
    names = ["0.bias", "2.weight"]
    assert la.n_params == 5 + 15
    assert torch.equal(la.mean.detach().to(ref.DTYPE), ref.flat_params(model, names))
    assert_close(
        F, ref.reference_curvature(model, names, x, y, "classification", structure, "ggn"), RTOL
    )

    seen = []

    def weights_only(name, param):
        seen.append(name)
        assert isinstance(param, torch.Tensor)
        return name.endswith("weight")

    la, F = fit_dense(model, x, y, structure=structure, subset=weights_only)
    names = ["0.weight", "2.weight"]
    assert set(seen) >= {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert la.n_params == 20 + 15
    assert_close(
        F, ref.reference_curvature(model, names, x, y, "classification", structure, "ggn"), RTOL
    )


@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_last_layer_is_block_of_all_weights(structure, kind):
    g = generator(7)
    model = ref.mlp(3, g)
    x, y = _cls_data(8, 4, 3, g)
    all_names = ref.trainable_names(model)
    _, F_all = fit_dense(model, x, y, structure=structure, kind=kind)
    la, F_last = fit_dense(model, x, y, structure=structure, kind=kind, subset="last_layer")
    last = ref.last_linear_names(model, x)
    assert last == ["2.weight", "2.bias"]
    P_last = 15 + 3
    assert la.n_params == P_last
    assert torch.equal(la.mean.detach().to(ref.DTYPE), ref.flat_params(model, last))
    s = slice(len(ref.flat_params(model, all_names)) - P_last, None)
    assert_close(F_last, F_all[s, s], RTOL)
    assert_close(
        F_last, ref.reference_curvature(model, last, x, y, "classification", structure, kind), RTOL
    )


@pytest.mark.parametrize("structure", STRUCTURES)
def test_last_layer_is_last_executed_linear_even_if_followed_by_ops(structure):
    g = generator(8)
    model = ref.init_(HeadFirst(), g)
    x, y = _cls_data(8, 4, 3, g)
    last = ref.last_linear_names(model, x)
    assert last == ["head.weight", "head.bias"]
    la, F = fit_dense(model, x, y, structure=structure, subset="last_layer")
    assert la.n_params == 18
    assert torch.equal(la.mean.detach().to(ref.DTYPE), ref.flat_params(model, last))
    assert_close(
        F, ref.reference_curvature(model, last, x, y, "classification", structure, "ggn"), RTOL
    )


# --------------------------------------------------------------------------- #
# likelihood details
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_regression_per_output_sigma(structure, kind):
    g = generator(9)
    model = ref.mlp(2, g)
    x = torch.randn(9, 4, generator=g, dtype=ref.DTYPE)
    y = torch.randn(9, 2, generator=g, dtype=ref.DTYPE)
    sigma = torch.tensor([0.5, 1.5], dtype=ref.DTYPE)
    names = ref.trainable_names(model)
    expected = ref.reference_curvature(model, names, x, y, "regression", structure, kind, sigma)
    _, F = fit_dense(model, x, y, "regression", structure, kind, sigma_noise=sigma)
    assert_close(F, expected, RTOL)


def test_regression_sigma_is_not_just_a_scale_factor():
    """Per-output sigma weights the outputs differently: it is not equivalent to any scalar."""
    g = generator(10)
    model = ref.mlp(2, g)
    x = torch.randn(9, 4, generator=g, dtype=ref.DTYPE)
    y = torch.randn(9, 2, generator=g, dtype=ref.DTYPE)
    _, F1 = fit_dense(
        model, x, y, "regression", sigma_noise=torch.tensor([1.0, 1.0], dtype=ref.DTYPE)
    )
    _, F2 = fit_dense(
        model, x, y, "regression", sigma_noise=torch.tensor([0.5, 1.0], dtype=ref.DTYPE)
    )
    ratio = F2 / F1
    assert not torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))


@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_binary_float_targets(structure, kind):
    g = generator(11)
    model = ref.mlp(1, g)
    x = torch.randn(9, 4, generator=g, dtype=ref.DTYPE)
    y = torch.randint(0, 2, (9,), generator=g).to(ref.DTYPE)
    names = ref.trainable_names(model)
    expected = ref.reference_curvature(model, names, x, y, "binary", structure, kind)
    _, F = fit_dense(model, x, y, "binary", structure, kind)
    assert_close(F, expected, RTOL)


# --------------------------------------------------------------------------- #
# KFAC properties
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher"])
@pytest.mark.parametrize("likelihood", ["classification", "regression", "binary"])
def test_kfac_exact_for_one_datum_one_linear(likelihood, kind):
    g = generator(12)
    c = {"classification": 3, "regression": 2, "binary": 1}[likelihood]
    model = ref.init_(nn.Linear(4, c, dtype=ref.DTYPE), g)
    x = torch.randn(1, 4, generator=g, dtype=ref.DTYPE)
    y = ref.targets(likelihood, 1, c, g)
    _, K = fit_dense(model, x, y, likelihood, "kron", kind)
    _, Fu = fit_dense(model, x, y, likelihood, "full", kind)
    names = ref.trainable_names(model)
    exact = ref.reference_curvature(model, names, x, y, likelihood, "full", kind)
    s = ref.param_slices(model, names)
    for n in names:
        assert_close(K[s[n], s[n]], exact[s[n], s[n]], RTOL)
        assert_close(K[s[n], s[n]], Fu[s[n], s[n]], RTOL)
    # cross-blocks between weight and bias are not part of KFAC
    assert torch.all(K[s["weight"], s["bias"]] == 0)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("arch", ["mlp", "seq", "cnn", "embed"])
def test_batch_split_invariance(arch, structure):
    g = generator(13)
    if arch == "mlp":
        model, x = ref.mlp(3, g), torch.randn(9, 4, generator=g, dtype=ref.DTYPE)
    elif arch == "seq":
        model, x = ref.init_(SeqNet(), g), torch.randn(9, 2, 3, generator=g, dtype=ref.DTYPE)
    elif arch == "cnn":
        model, x = cnn(g), torch.randn(9, 1, 3, 3, generator=g, dtype=ref.DTYPE)
    else:
        model, x = ref.init_(EmbedNet("mean"), g), torch.randint(0, 6, (9, 4), generator=g)
    c = 2 if arch == "embed" else 3
    y = torch.randint(0, c, (9,), generator=g)
    mats = []
    for bs in (1, 3, 9):
        la, F = fit_dense(model, x, y, structure=structure, batch_size=bs)
        assert la.n_data == 9
        mats.append(F)
    assert_close(mats[0], mats[2], RTOL)
    assert_close(mats[1], mats[2], RTOL)


def test_fit_uses_eval_mode_and_restores_mode():
    g = generator(14)
    model = nn.Sequential(
        nn.Linear(4, 6, dtype=ref.DTYPE),
        nn.Dropout(0.5),
        nn.Tanh(),
        nn.Linear(6, 3, dtype=ref.DTYPE),
    )
    ref.init_(model, g)
    x, y = _cls_data(8, 4, 3, g)
    model.eval()
    expected = ref.dense_ggn(model, ref.trainable_names(model), x, "classification")
    model.train()
    _, F = fit_dense(model, x, y)
    assert model.training and model[1].training
    assert_close(F, expected, RTOL)
    model.eval()
    fit_dense(model, x, y)
    assert not model.training


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
def _small(likelihood="classification"):
    g = generator(15)
    c = {"classification": 3, "regression": 2, "binary": 1}[likelihood]
    model = ref.mlp(c, g)
    x = torch.randn(8, 4, generator=g, dtype=ref.DTYPE)
    return model, x, ref.targets(likelihood, 8, c, g)


def _snapshot(la):
    return (
        la.posterior_precision.to_dense().detach().clone(),
        la.n_data,
        la.mean.detach().clone(),
        la.n_params,
    )


def _assert_unchanged(la, snap):
    dense, n_data, mean, n_params = snap
    assert torch.equal(la.posterior_precision.to_dense(), dense)
    assert la.n_data == n_data
    assert torch.equal(la.mean, mean)
    assert la.n_params == n_params


BAD_TARGETS = {
    # likelihood -> list of (label, bad targets builder)
    "classification": [
        ("float dtype", lambda y: y.to(ref.DTYPE)),
        ("shape (B, 2)", lambda y: torch.stack([y, y], 1)),
        ("shape (B-1,)", lambda y: y[:-1]),
    ],
    "regression": [
        ("shape (B,)", lambda y: y[:, 0]),
        ("shape (B, 3)", lambda y: torch.cat([y, y[:, :1]], 1)),
        ("long dtype", lambda y: y.round().long()),
    ],
    "binary": [
        ("shape (B, 2)", lambda y: torch.stack([y, y], 1)),
        # integer 0/1 targets are a legitimate encoding; complex ones are not
        ("complex dtype", lambda y: y.to(torch.complex128)),
        ("shape (B-1,)", lambda y: y[:-1]),
    ],
}
_CASES = [(lik, lab, fn) for lik, items in BAD_TARGETS.items() for lab, fn in items]


@pytest.mark.parametrize(
    ("likelihood", "label", "make_bad"), _CASES, ids=[f"{a}-{b}" for a, b, _ in _CASES]
)
def test_bad_targets(likelihood, label, make_bad):
    model, x, y = _small(likelihood)
    la = Laplace(model, likelihood=likelihood, structure="diag")
    la.fit(ref.loader(x, y), progress=False)
    snap = _snapshot(la)
    y_bad = make_bad(y)
    # a plain list of (inputs, targets) batches, so that row counts may disagree
    data = [(x[:5], y_bad[:5]), (x[5:], y_bad[5:])]
    with pytest.raises((ValueError, TypeError), match=r"(?i)target|label|shape|dtype"):
        la.fit(data, progress=False)
    _assert_unchanged(la, snap)


@pytest.mark.parametrize(
    ("likelihood", "bad"),
    [
        ("classification", lambda y: torch.where(y == 0, 3, y)),  # class index == C
        ("classification", lambda y: torch.where(y == 0, -1, y)),
        ("binary", lambda y: y * 2.0),  # not in {0, 1}
    ],
)
def test_targets_out_of_range(likelihood, bad):
    model, x, y = _small(likelihood)
    la = Laplace(model, likelihood=likelihood, structure="diag")
    with pytest.raises((ValueError, TypeError), match=r"(?i)target|label|range"):
        la.fit(ref.loader(x, bad(y)), progress=False)


def test_nan_output_names_batch_index():
    model, x, y = _small()
    la = Laplace(model, structure="kron")
    la.fit(ref.loader(x, y, 3), progress=False)
    snap = _snapshot(la)
    x_bad = x.clone()
    x_bad[7, 0] = float("nan")  # batches of 3: rows 6..7 are batch index 2 (0-based)
    with pytest.raises(ValueError, match=r"(?i)nan|finite") as info:
        la.fit(ref.loader(x_bad, y, 3), progress=False)
    assert re.search(r"(?i)batch\D{0,12}2\b", str(info.value)), str(info.value)
    _assert_unchanged(la, snap)


@pytest.mark.parametrize("empty", ["list", "loader"])
def test_empty_loader(empty):
    model, x, y = _small()
    la = Laplace(model, structure="diag")
    la.fit(ref.loader(x, y), progress=False)
    snap = _snapshot(la)
    data = [] if empty == "list" else ref.loader(x[:0], y[:0])
    with pytest.raises(ValueError, match=r"(?i)empty|no batch|no data|at least one"):
        la.fit(data, progress=False)
    _assert_unchanged(la, snap)


@pytest.mark.parametrize(
    "subset",
    [
        pytest.param(lambda n, p: False, id="callable-none"),
        pytest.param(["0.weight"], id="frozen-only"),
        pytest.param(["does_not_exist"], id="unknown-name"),
    ],
)
def test_subset_selecting_nothing(subset):
    model, x, y = _small()
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"(?i)subset|param|does_not_exist"):
        Laplace(model, subset=subset, structure="diag").fit(ref.loader(x, y), progress=False)


@pytest.mark.parametrize("item", ["bare tensor", "3-tuple", "1-tuple"])
def test_loader_items_not_pairs(item):
    model, x, y = _small()
    la = Laplace(model, structure="diag")
    la.fit(ref.loader(x, y), progress=False)
    snap = _snapshot(la)
    if item == "bare tensor":
        data = [x[:4], x[4:]]
    elif item == "3-tuple":
        data = [(x, y, y)]
    else:
        data = [(x,)]
    with pytest.raises((TypeError, ValueError), match=r"(?i)input|target|pair|tuple"):
        la.fit(data, progress=False)
    _assert_unchanged(la, snap)


@pytest.mark.parametrize(
    ("option", "bad", "valid"),
    [
        ("likelihood", "poisson", ["classification", "regression", "binary"]),
        ("structure", "block", ["full", "diag", "kron"]),
        ("curvature", "hessian", ["ggn", "fisher", "empirical_fisher"]),
    ],
)
def test_unknown_option_lists_valid_values(option, bad, valid):
    model, x, y = _small()
    with pytest.raises(ValueError, match=bad) as info:
        Laplace(model, **{option: bad}).fit(ref.loader(x, y), progress=False)
    for v in valid:
        assert v in str(info.value), str(info.value)


def test_full_structure_refuses_too_many_parameters():
    model = nn.Linear(200, 100, dtype=ref.DTYPE)  # 20,100 parameters
    x = torch.zeros(2, 200, dtype=ref.DTYPE)
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"diag|kron"):
        Laplace(model, structure="full").fit(ref.loader(x, y), progress=False)


def test_failed_fit_restores_model_mode():
    model, x, y = _small()
    la = Laplace(model, structure="diag")
    model.train()
    with pytest.raises((ValueError, TypeError)):
        la.fit(ref.loader(x, y.to(ref.DTYPE)), progress=False)
    assert model.training
    assert all(m.training for m in model.modules())


def test_fit_does_not_modify_model_or_data():
    model, x, y = _small()
    before = copy.deepcopy(model.state_dict())
    x0, y0 = x.clone(), y.clone()
    fit_dense(model, x, y, structure="kron", kind="fisher")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert all(p.grad is None for p in model.parameters())
