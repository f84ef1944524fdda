"""Columns backpropagated in parts (``curvature.engine.PART_BYTES``) give the same curvature.

A batch whose output gradients would exceed ``PART_BYTES`` is backpropagated a part of
its columns at a time; every statistic but the inputs' (a Kronecker input factor and its
row count, counted with the first part only) is a sum over the parts. Here the budget is
one byte, so every column is its own part; a spy proves the parts ran. References: the
dense float64 brute force of ``reference.py``, and the same fit in one part.
"""

from __future__ import annotations

import weakref

import pytest
import reference as ref
import torch
from helpers import REFERENCE_STRUCTURES, STRUCTURE_CASES, assert_close, generator
from torch import nn

from laplacefim import Laplace, NaturalGradient
from laplacefim.curvature import engine as engine_module
from laplacefim.curvature.segments import conv as conv_segments
from laplacefim.structures import BlockDiagonal

RTOL = 1e-10


class ConvNormNet(nn.Module):
    """A convolution with a bias, batch norm (a diagonal block under KFAC), a strided
    convolution, and a linear head: four output classes, so four exact-GGN columns."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1, dtype=ref.DTYPE)
        self.norm = nn.BatchNorm2d(3, dtype=ref.DTYPE)
        self.b = nn.Conv2d(3, 2, 2, stride=2, dtype=ref.DTYPE)
        self.head = nn.Linear(8, 4, dtype=ref.DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.norm(self.a(x)))
        return self.head(torch.tanh(self.b(x)).flatten(1))


class TokenNet(nn.Module):
    """An embedding, a linear layer over positions, and a head tied to nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 3, dtype=ref.DTYPE)
        self.mix = nn.Linear(3, 3, dtype=ref.DTYPE)
        self.head = nn.Linear(3, 3, dtype=ref.DTYPE)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))).mean(1))


def conv_problem(seed: int = 5):
    g = generator(seed)
    model = ref.init_(ConvNormNet(), g, 0.6).eval()
    with torch.no_grad():  # running statistics that are not the identity
        model.norm.running_mean.uniform_(-0.5, 0.5, generator=g)
        model.norm.running_var.uniform_(0.5, 2.0, generator=g)
    x = torch.randn(7, 1, 4, 4, generator=g, dtype=ref.DTYPE)
    y = torch.randint(0, 4, (7,), generator=g)
    return model, x, y


def token_problem(seed: int = 6):
    g = generator(seed)
    model = ref.init_(TokenNet(), g, 0.8)
    x = torch.randint(0, 7, (7, 4), generator=g)
    y = torch.randint(0, 3, (7,), generator=g)
    return model, x, y


class SequenceNet(nn.Module):
    """Self-attention (its rule replays the layer per part) and an LSTM over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, dtype=ref.DTYPE)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True, dtype=ref.DTYPE)
        self.rnn = nn.LSTM(4, 3, batch_first=True, dtype=ref.DTYPE)
        self.head = nn.Linear(3, 3, dtype=ref.DTYPE)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.rnn(h)[0][:, -1])


def sequence_problem(seed: int = 7):
    g = generator(seed)
    model = ref.init_(SequenceNet(), g, 0.7)
    x = torch.randint(0, 7, (7, 4), generator=g)
    y = torch.randint(0, 3, (7,), generator=g)
    return model, x, y


PROBLEMS = {"conv": conv_problem, "tokens": token_problem}
ONE_PART_PROBLEMS = {**PROBLEMS, "sequence": sequence_problem}


@pytest.fixture
def parts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One column per part; returns the number of columns of every backward pass."""
    monkeypatch.setattr(engine_module, "PART_BYTES", 1)
    seen: list[int] = []
    backward = engine_module.CurvatureEngine.backward

    def counted(self, f, cols, calls, **kw):  # type: ignore[no-untyped-def]
        seen.append(cols.shape[0])
        return backward(self, f, cols, calls, **kw)

    monkeypatch.setattr(engine_module.CurvatureEngine, "backward", counted)
    return seen


def fitted(model: nn.Module, x, y, structure: object, kind: str, **kw) -> torch.Tensor:
    la = Laplace(
        model, "classification", structure=structure, curvature=kind, prior_precision=0.0, **kw
    )
    la.fit(ref.loader(x, y, 3), progress=False, generator=torch.Generator().manual_seed(3))
    return la.posterior_precision.to_dense().detach()


@pytest.mark.parametrize("kind", ["ggn", "fisher"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("structure", REFERENCE_STRUCTURES)
def test_parts_equal_the_reference(parts: list[int], structure: str, problem: str, kind: str):
    model, x, y = PROBLEMS[problem]()
    names = ref.trainable_names(model)
    n_classes = 4 if problem == "conv" else 3
    if kind == "ggn":
        expected = ref.reference_curvature(model, names, x, y, "classification", structure, "ggn")
        got = fitted(model, x, y, structure, kind)
    else:  # three sampled labels per datum: three columns, drawn once per batch
        with pytest.MonkeyPatch.context() as one_part:
            one_part.setattr(engine_module, "PART_BYTES", 1 << 40)
            expected = fitted(model, x, y, structure, kind, fisher_samples=3)
        parts.clear()
        got = fitted(model, x, y, structure, kind, fisher_samples=3)
        n_classes = 3
    assert_close(got, expected, RTOL)
    assert parts and set(parts) == {1}  # one column per backward pass
    assert len(parts) == 3 * n_classes  # three batches, every column its own part


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("structure", list(STRUCTURE_CASES))
@pytest.mark.parametrize("problem", list(ONE_PART_PROBLEMS))
def test_parts_equal_one_part(parts: list[int], problem: str, structure: str, kfac_approx: str):
    """Every structure (the multi-pass ones replay cached parts), both KFAC flavours;
    attention and recurrent rules, which replay their layer for every part."""
    model, x, y = ONE_PART_PROBLEMS[problem]()
    with pytest.MonkeyPatch.context() as one_part:
        one_part.setattr(engine_module, "PART_BYTES", 1 << 40)
        expected = fitted(model, x, y, STRUCTURE_CASES[structure], "ggn", kfac_approx=kfac_approx)
    assert set(parts) == {4 if problem == "conv" else 3}
    parts.clear()
    got = fitted(model, x, y, STRUCTURE_CASES[structure], "ggn", kfac_approx=kfac_approx)
    assert set(parts) == {1}
    assert_close(got, expected, RTOL)


def test_multi_pass_fit_without_its_cache_runs_the_parts_again(parts: list[int]):
    model, x, y = conv_problem()
    dense = ref.reference_curvature(
        model, ref.trainable_names(model), x, y, "classification", "full", "ggn"
    )
    cached = fitted(model, x, y, "ekfac", "ggn")
    n_cached = len(parts)
    uncached = fitted(model, x, y, "ekfac", "ggn", pass_cache_mb=0.0)
    assert len(parts) - n_cached == 2 * n_cached  # the second pass ran the model again
    assert_close(uncached, cached, RTOL)
    # EKFAC's eigenvalues are the squared per-sample gradients in an orthonormal basis:
    # their sum is the trace of the exact GGN
    assert_close(torch.trace(cached), torch.trace(dense), RTOL)


def test_shifted_convolution_factor_in_parts(parts: list[int], monkeypatch: pytest.MonkeyPatch):
    """The in-place input factor (``ConvProduct.kron_into``) is added once per batch; the
    shifted diagonal sums every part."""
    monkeypatch.setattr(conv_segments, "SHIFTED_GRAM_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv_segments, "SHIFTED_GRAM_MIN_COST", 0)
    monkeypatch.setattr(conv_segments, "SHIFTED_GRAM_MARGIN", 0.0)
    monkeypatch.setattr(conv_segments, "SHIFTED_DIAGONAL_MIN_POSITIONS", 0)
    monkeypatch.setattr(conv_segments, "SHIFTED_DIAGONAL_MIN_CHANNELS", 0)
    shifted = []
    diagonal = conv_segments.shifted_diagonal
    monkeypatch.setattr(
        conv_segments, "shifted_diagonal", lambda *a: shifted.append(1) or diagonal(*a)
    )
    model, x, y = conv_problem(8)
    names = ref.trainable_names(model)
    for structure in ("kron", "diag"):
        expected = ref.reference_curvature(model, names, x, y, "classification", structure, "ggn")
        assert_close(fitted(model, x, y, structure, "ggn"), expected, RTOL)
    assert len(shifted) == 3 * 4  # the diagonal fit's first convolution: every part


def test_natural_gradient_statistics_in_parts(parts: list[int]):
    model, x, y = conv_problem()
    steps = []
    for budget in (1 << 40, 1):
        engine_module.PART_BYTES = budget
        ngd = NaturalGradient(model, "classification", n_data=7, curvature="ggn", structure="kron")
        ngd.update_statistics(x, y)
        steps.append([t.clone() for t in ngd.statistics.state()])
    for got, expected in zip(steps[1], steps[0], strict=True):
        assert_close(got, expected, RTOL)
    assert 1 in parts and 4 in parts


def test_uneven_parts_count_each_batch_once(parts: list[int], monkeypatch: pytest.MonkeyPatch):
    """Batches of 3, 3 and 1 under a budget of three columns of one datum: the full
    batches go one column per part (4 parts), the last one three columns at a time (2
    parts). With as many parts in every batch, counting a batch's input factor once per
    part would scale the factor and its row count alike and cancel; here it cannot."""
    model, x, y = conv_problem(9)
    per_datum = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: per_datum.append(o[0].numel() * o.element_size()))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))
    ]
    model(x[:1])
    for hook in hooks:
        hook.remove()
    monkeypatch.setattr(engine_module, "PART_BYTES", 3 * sum(per_datum))
    names = ref.trainable_names(model)
    expected = ref.reference_curvature(model, names, x, y, "classification", "kron", "ggn")
    got = fitted(model, x, y, "kron", "ggn")
    assert parts == [1, 1, 1, 1, 1, 1, 1, 1, 3, 1]
    assert_close(got, expected, RTOL)


def test_one_part_alive_at_a_time(parts: list[int], monkeypatch: pytest.MonkeyPatch):
    """While a part is added, the previous part's output gradients are gone (a single-pass
    fit keeps no part): a batch holds one part's gradients, not all of them."""
    model, x, y = conv_problem()
    previous: list[weakref.ref] = []
    alive_before_add: list[bool] = []
    accumulate = BlockDiagonal.accumulate_

    def spy(self, segments, **kw):  # type: ignore[no-untyped-def]
        alive_before_add.extend(ref_() is not None for ref_ in previous)
        previous.clear()
        previous.extend(weakref.ref(s.grads) for segs in segments.values() for s in segs)
        return accumulate(self, segments, **kw)

    monkeypatch.setattr(BlockDiagonal, "accumulate_", spy)
    fitted(model, x, y, "kron", "ggn")
    assert len(parts) == 12 and alive_before_add and not any(alive_before_add)
