"""The layer-rule contract: every registered rule's per-sample gradients are exact, and every
segment it returns answers each question consistently with those gradients.

For each case in ``RULE_CASES`` (which must cover the registered module types), a tiny
float64 model containing the module is run through the engine with the Jacobian columns
(``V = C`` unit vectors): each chosen parameter's per-sample gradients ``u (C, B, p)`` from
the rule's segments must equal the per-datum Jacobian from ``torch.func`` (reference.py).
Then every segment's fast paths are checked against ``u`` itself: the exact diagonal,
weighted Gram matrices, products with vectors, combinations, sums over the batch,
Kronecker factors (against ``Σ g gᵀ``/``Σ a aᵀ`` written out here), and the coordinates in
a rotated basis.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import reference as ref
import torch
from helpers import assert_close, generator
from torch import Tensor, nn

from laplacefim.curvature import CurvatureEngine
from laplacefim.curvature.rules import RULES
from laplacefim.inputs import ModelIO
from laplacefim.likelihoods import make_likelihood
from laplacefim.options import CurvatureKind, KfacApprox
from laplacefim.subsets import select

DTYPE = torch.float64
RTOL = 1e-10


class Head(nn.Module):
    """The module under test, then tanh, a flatten and a linear head to 3 outputs."""

    def __init__(self, inner: nn.Module, width: int) -> None:
        super().__init__()
        self.inner = inner
        self.head = nn.Linear(width, 3, dtype=DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inner(x)).flatten(1))


def _tokens(g: torch.Generator) -> Tensor:
    ids = torch.randint(0, 6, (5, 4), generator=g)
    ids[0] = torch.tensor([1, 1, 2, 1])  # a token repeated within a datum
    return ids


def _sequences(g: torch.Generator) -> Tensor:
    return torch.randn(5, 4, 3, generator=g, dtype=DTYPE)


class Attention(nn.Module):
    """Self-attention (or attention to a second sequence), the output only."""

    def __init__(self, batch_first: bool = True, cross: bool = False, **options) -> None:
        super().__init__()
        kdim = 2 if cross else None
        self.attn = nn.MultiheadAttention(
            6, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, dtype=DTYPE, **options
        )
        self.up = nn.Linear(3, 6, dtype=DTYPE)
        self.batch_first, self.cross = batch_first, cross

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)
        mask = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
        mask[:, -1] = True  # the last position is padding
        context = x[..., :2] if self.cross else h
        if not self.batch_first:
            h, context = h.transpose(0, 1), context.transpose(0, 1)
        out, weights = self.attn(h, context, context, key_padding_mask=mask, need_weights=True)
        out = out if self.batch_first else out.transpose(0, 1)
        return out + weights.sum(-1, keepdim=True)  # the weights reach the loss too


class Causal(nn.Module):
    """Self-attention with a causal boolean mask and no weights returned."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(3, 1, batch_first=True, dtype=DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        return self.attn(x, x, x, attn_mask=causal, need_weights=False)[0]


class Recurrent(nn.Module):
    """A recurrent layer's output sequence plus its final hidden state."""

    def __init__(self, cls: type, **options) -> None:
        super().__init__()
        self.rnn = cls(3, 4, dtype=DTYPE, **options)

    def forward(self, x: Tensor) -> Tensor:
        first = self.rnn.batch_first
        out, state = self.rnn(x if first else x.transpose(0, 1))
        out = out if first else out.transpose(0, 1)
        hidden = state[0] if isinstance(state, tuple) else state
        return out + hidden[-1][:, None, : out.shape[-1]].sum(-1, keepdim=True)


class TransposedLinear(nn.Module):
    """``x @ W + b`` with ``W (d_in, d_out)``, as HuggingFace's ``Conv1D``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out, dtype=DTYPE))
        self.bias = nn.Parameter(torch.randn(d_out, dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(
            *x.shape[:-1], -1
        )


class Scale(nn.Module):
    """A module with a raw parameter and no rule of its own: the generic rule."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width, dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(x) * self.scale


def _trained_batchnorm() -> nn.Module:
    """A BatchNorm2d with running statistics away from (0, 1)."""
    norm = nn.BatchNorm2d(4, dtype=DTYPE)
    norm.running_mean.copy_(torch.linspace(-0.5, 0.5, 4, dtype=DTYPE))
    norm.running_var.copy_(torch.linspace(0.5, 2.0, 4, dtype=DTYPE))
    return norm


def _hf_conv1d() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(4, 3).to(DTYPE)
    return Head(conv, 16)


# label -> (module type the case covers, model factory, input factory); a rule is a line.
RULE_CASES: dict[
    str, tuple[object, Callable[[], nn.Module], Callable[[torch.Generator], Tensor]]
] = {
    "linear-positions": (  # a weight shared over T=2 positions
        nn.Linear,
        lambda: Head(nn.Linear(3, 4, dtype=DTYPE), 8),
        lambda g: torch.randn(5, 2, 3, generator=g, dtype=DTYPE),
    ),
    "conv2d": (
        nn.Conv2d,
        lambda: Head(nn.Conv2d(2, 2, 2, padding=1, dtype=DTYPE), 2 * 4 * 4),
        lambda g: torch.randn(5, 2, 3, 3, generator=g, dtype=DTYPE),
    ),
    "embedding": (
        nn.Embedding,
        lambda: Head(nn.Embedding(6, 3, padding_idx=5, dtype=DTYPE), 12),
        _tokens,
    ),
    "layernorm": (
        nn.LayerNorm,
        lambda: Head(nn.LayerNorm(4, dtype=DTYPE), 4),
        lambda g: torch.randn(5, 4, generator=g, dtype=DTYPE),
    ),
    "layernorm-3d-normalized-2d": (
        nn.LayerNorm,
        lambda: Head(nn.LayerNorm((2, 3), dtype=DTYPE), 6),
        lambda g: torch.randn(5, 2, 3, generator=g, dtype=DTYPE),
    ),
    "groupnorm": (
        nn.GroupNorm,
        lambda: Head(nn.GroupNorm(2, 4, dtype=DTYPE), 4 * 3),
        lambda g: torch.randn(5, 4, 3, generator=g, dtype=DTYPE),
    ),
    "batchnorm-eval": (
        nn.modules.batchnorm._BatchNorm,
        lambda: Head(_trained_batchnorm(), 4 * 6),
        lambda g: torch.randn(5, 4, 2, 3, generator=g, dtype=DTYPE),
    ),
    "generic-raw-parameter": (
        "generic",
        lambda: Head(Scale(4), 4),
        lambda g: torch.randn(5, 4, generator=g, dtype=DTYPE),
    ),
    "attention": (nn.MultiheadAttention, lambda: Head(Attention(), 24), _sequences),
    "attention-seq-first-bias-kv-zero": (
        nn.MultiheadAttention,
        lambda: Head(Attention(batch_first=False, add_bias_kv=True, add_zero_attn=True), 24),
        _sequences,
    ),
    "attention-separate-kv": (
        nn.MultiheadAttention,
        lambda: Head(Attention(cross=True), 24),
        _sequences,
    ),
    "attention-causal": (nn.MultiheadAttention, lambda: Head(Causal(), 12), _sequences),
    "lstm-2-layers-bidirectional-proj": (
        nn.RNNBase,
        lambda: Head(
            Recurrent(nn.LSTM, num_layers=2, bidirectional=True, proj_size=2, batch_first=True), 16
        ),
        _sequences,
    ),
    "gru-seq-first": (
        nn.RNNBase,
        lambda: Head(Recurrent(nn.GRU, batch_first=False), 16),
        _sequences,
    ),
    "rnn-relu": (
        nn.RNNBase,
        lambda: Head(Recurrent(nn.RNN, nonlinearity="relu", batch_first=True), 16),
        _sequences,
    ),
    "transposed-linear": (
        "behaviour",
        lambda: Head(TransposedLinear(3, 4), 8),
        lambda g: torch.randn(5, 2, 3, generator=g, dtype=DTYPE),
    ),
    "hf-conv1d": ("behaviour", _hf_conv1d, _sequences),
}


def test_case_list_covers_the_registered_types():
    covered = {case[0] for case in RULE_CASES.values()}
    assert set(RULES.types) <= covered


def _engine(model: nn.Module) -> CurvatureEngine:
    selection = select(model, "all")
    return CurvatureEngine(
        model,
        selection,
        CurvatureKind.GGN,
        make_likelihood("classification"),
        torch.ones((), dtype=DTYPE),
        ModelIO(),
        fisher_samples=1,
        dtype=DTYPE,
    )


@pytest.mark.parametrize("case", list(RULE_CASES))
def test_rule_gradients_are_exact_and_segments_consistent(case):
    g = generator(3)
    model = ref.init_(RULE_CASES[case][1](), g, 0.6).eval()  # as in a fit
    x = RULE_CASES[case][2](g)
    engine = _engine(model)
    rows = engine.jacobian_rows(x, x.shape[0])
    names = ref.trainable_names(model)
    jacobian = ref.loop_jacobian(model, names, x).transpose(0, 1)  # (C, B, P)
    slices = ref.param_slices(model, names)
    scale = float(jacobian.abs().max())  # a key bias's exact gradient is 0: compare on this scale
    for name in names:
        segments = rows.segments[name]
        u = torch.cat([s.per_sample() for s in segments], dim=2)
        assert_close(u, jacobian[:, :, slices[name]], RTOL, RTOL * scale)
        start = 0
        for segment in segments:
            part = u[:, :, start : start + segment.size]
            start += segment.size
            _check_segment(segment, part, g, scale)


def _check_segment(segment, u: Tensor, g: torch.Generator, scale: float) -> None:
    """Each fast path against ``u``; ``scale`` is the whole Jacobian's (absolute errors are
    judged on it, since a parameter's exact gradient may be zero, as a key bias's is)."""
    n_columns, batch, size = u.shape
    one, two = RTOL * scale, RTOL * scale**2
    weights = torch.rand(size, generator=g, dtype=DTYPE)
    vectors = torch.randn(2, size, generator=g, dtype=DTYPE)
    coefficients = torch.randn(n_columns, batch, 2, generator=g, dtype=DTYPE)
    assert_close(segment.diag(), u.square().sum((0, 1)), RTOL, two)
    assert_close(segment.gram(weights), torch.einsum("vbp,wbp,p->bvw", u, u, weights), RTOL, two)
    assert_close(segment.dots(vectors), torch.einsum("vbp,kp->vbk", u, vectors), RTOL, one)
    expected = torch.einsum("vbk,vbp->kp", coefficients, u)
    assert_close(segment.combine(coefficients), expected, RTOL, one)
    assert_close(segment.total(), u.sum(1), RTOL, one)
    factors = segment.kron(KfacApprox.EXPAND)
    if factors is None:
        return
    first, second, count = factors
    dense = lambda f: torch.diag(f) if f.ndim == 1 else f  # noqa: E731
    assert torch.kron(dense(first), dense(second)).shape == (size, size)
    # a random orthonormal basis per factor (identity for a diagonal one)
    q_first = (
        None
        if first.ndim == 1
        else torch.linalg.qr(torch.randn(*first.shape, generator=g, dtype=DTYPE))[0]
    )
    q_second = (
        None
        if second.ndim == 1
        else torch.linalg.qr(torch.randn(*second.shape, generator=g, dtype=DTYPE))[0]
    )
    eye_first = torch.eye(first.shape[0], dtype=DTYPE) if q_first is None else q_first
    eye_second = torch.eye(second.shape[0], dtype=DTYPE) if q_second is None else q_second
    basis = torch.kron(eye_first.contiguous(), eye_second.contiguous())  # rotated coordinates
    rotated = segment.rotated(q_first, q_second)
    assert_close(rotated.per_sample(), u @ basis, RTOL, one)
    assert_close(rotated.diag(), (u @ basis).square().sum((0, 1)), RTOL, two)
    assert float(count) > 0


def test_product_factors_are_sums_of_outer_products():
    """Linear weight shared over T positions: G = Σ g gᵀ and A = Σ a aᵀ over (datum,
    position) rows for expand; over data, with g summed and a averaged, for reduce."""
    g = generator(4)
    model = ref.init_(RULE_CASES["linear-positions"][1](), g)
    x = RULE_CASES["linear-positions"][2](g)
    engine = _engine(model)
    rows = engine.jacobian_rows(x, x.shape[0])
    (segment,) = rows.segments["inner.weight"]
    out = torch.einsum("bti,oi->bto", x, model.inner.weight)  # layer output, (B, T, d_out)
    grads = segment.grads  # (C, B, T, d_out), against the layer output
    assert grads.shape[1:] == out.shape
    first, second, count = segment.kron(KfacApprox.EXPAND)
    rows_g, rows_a = grads.reshape(-1, 4), x.reshape(-1, 3)
    assert_close(first, rows_g.T @ rows_g, RTOL)
    assert_close(second, rows_a.T @ rows_a, RTOL)
    assert float(count) == 10
    first, second, count = segment.kron(KfacApprox.REDUCE)
    summed, mean = grads.sum(2).reshape(-1, 4), x.mean(1)
    assert_close(first, summed.T @ summed, RTOL)
    assert_close(second, mean.T @ mean, RTOL)
    assert float(count) == 5
