"""A stride-1 convolution's Kronecker input factor from shifted products of its input
(``laplacefim.curvature.segments.conv``) equals the Gram matrix of its unfolded patches,
for every kernel, dilation and zero padding; a KFAC fit that takes that route equals the
brute-force reference; and convolutions the route cannot describe keep the patches.

References: ``F.unfold`` patches multiplied out in float64, and ``reference.py``.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from helpers import assert_close, generator
from torch import nn

from laplacefim import Laplace
from laplacefim.curvature.segments import Product
from laplacefim.curvature.segments import base as segments_base
from laplacefim.curvature.segments import conv as conv_segments
from laplacefim.curvature.segments.conv import ConvProduct, Geometry, conv_product, shifted_gram
from laplacefim.options import KfacApprox

GEOMETRIES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3),
    dict(kernel_size=5, padding=2),
    dict(kernel_size=(3, 2), padding=(2, 0)),
    dict(kernel_size=3, dilation=2, padding=2),
    dict(kernel_size=(2, 3), dilation=(3, 1), padding=(1, 3)),
    dict(kernel_size=4, padding="same"),
    dict(kernel_size=3, padding=4),
    dict(kernel_size=1),
]


def unfolded(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``(B, T, d)`` patches by ``F.unfold`` of the input padded as the layer pads it."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    return F.unfold(padded, conv.kernel_size, conv.dilation, 0, conv.stride).transpose(1, 2)


def force_shifted_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the shifted routes (input factor and diagonal) on every convolution they can
    describe, however small."""
    monkeypatch.setattr(conv_segments, "SHIFTED_GRAM_MARGIN", 0.0)
    monkeypatch.setattr(conv_segments, "SHIFTED_GRAM_MIN_CHANNELS", 0)
    monkeypatch.setattr(conv_segments, "SHIFTED_GRAM_MIN_COST", 0)
    monkeypatch.setattr(conv_segments, "SHIFTED_DIAGONAL_MIN_POSITIONS", 0)
    monkeypatch.setattr(conv_segments, "SHIFTED_DIAGONAL_MIN_CHANNELS", 0)


@pytest.mark.parametrize("options", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
@pytest.mark.parametrize("size", [(7, 6), (3, 9)])
def test_shifted_gram_equals_the_patch_gram(options: dict, size: tuple[int, int]) -> None:
    g = generator(0)
    conv = nn.Conv2d(3, 4, **options, dtype=torch.float64)
    x = torch.randn(4, 3, *size, generator=g, dtype=torch.float64)
    patches = unfolded(conv, x)
    expected = torch.einsum("bti,btj->ij", patches, patches)
    geometry = Geometry.of(conv, x)
    assert geometry is not None
    got = shifted_gram(x, geometry)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1 << 24, 40])
@pytest.mark.parametrize("n_columns", [1, 3])
@pytest.mark.parametrize("options", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
@pytest.mark.parametrize("size", [(9, 8), (3, 9)])
def test_shifted_diagonal_equals_the_patch_diagonal(
    monkeypatch: pytest.MonkeyPatch, options: dict, size: tuple[int, int], n_columns: int, chunk
) -> None:
    """``Σ_{v,b} u²`` from shifted per-sample products equals the squares of the per-sample
    gradients multiplied out from ``F.unfold`` patches (in chunks of data or not)."""
    monkeypatch.setattr(segments_base, "CHUNK_ELEMENTS", chunk)
    g = generator(2)
    conv = nn.Conv2d(3, 4, **options, dtype=torch.float64)
    x = torch.randn(5, 3, *size, generator=g, dtype=torch.float64)
    out = conv(x)
    positions = out.shape[2] * out.shape[3]
    # output gradients laid out as the engine hands them: a transposed (V, B, d_out, T)
    grads = torch.randn(n_columns, 5, 4, positions, generator=g, dtype=torch.float64)
    grads = grads.transpose(-1, -2)
    patches = unfolded(conv, x)
    per_sample = torch.einsum("vbto,bti->vboi", grads, patches)  # (V, B, d_out, d)
    expected = per_sample.square().sum((0, 1)).reshape(-1)
    segment = conv_product(conv, [x], grads, {})
    assert isinstance(segment, ConvProduct) and segment.geometries is not None
    monkeypatch.setattr(conv_segments, "SHIFTED_DIAGONAL_MIN_POSITIONS", 0)
    monkeypatch.setattr(conv_segments, "SHIFTED_DIAGONAL_MIN_CHANNELS", 0)
    torch.testing.assert_close(segment.diag(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shifted", [True, False])
def test_a_layer_called_twice_sums_its_calls(
    monkeypatch: pytest.MonkeyPatch, shifted: bool
) -> None:
    """Two calls on images of different sizes: factors (formed, and added to totals in
    place), diagonal and per-sample gradients equal those of the patches of both calls
    stacked as positions."""
    if shifted:
        force_shifted_route(monkeypatch)
    else:
        monkeypatch.setattr(conv_segments, "SHIFTED_GRAM_MIN_CHANNELS", 1 << 30)
    g = generator(1)
    conv = nn.Conv2d(2, 3, 3, padding=1, dtype=torch.float64)
    images = [torch.randn(5, 2, s, s, generator=g, dtype=torch.float64) for s in (4, 6)]
    grads = torch.randn(2, 5, 16 + 36, 3, generator=g, dtype=torch.float64)
    segment = conv_product(conv, images, grads, {})
    assert isinstance(segment, ConvProduct) and segment.shifted is shifted
    patches = torch.cat([unfolded(conv, x) for x in images], 1)
    expected = Product(patches, grads)
    for approx in KfacApprox:
        for got, want in zip(segment.kron(approx), expected.kron(approx), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # added in place to running totals, twice: twice the factors
    totals = [torch.zeros(3, 3, dtype=torch.float64), torch.zeros(18, 18, dtype=torch.float64)]
    totals.append(torch.zeros((), dtype=torch.float64))
    assert segment.kron_into(KfacApprox.EXPAND, totals)
    assert segment.kron_into(KfacApprox.EXPAND, totals)
    for got, want in zip(totals, expected.kron(KfacApprox.EXPAND), strict=True):
        torch.testing.assert_close(got, 2 * want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(segment.diag(), expected.diag(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(segment.per_sample(), expected.per_sample(), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "options",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
        dict(kernel_size=3, padding=1, padding_mode="circular"),
    ],
)
def test_convolutions_the_route_cannot_describe_keep_their_patches(
    monkeypatch: pytest.MonkeyPatch, options: dict
) -> None:
    force_shifted_route(monkeypatch)
    conv = nn.Conv2d(2, 3, **options, dtype=torch.float64)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    out = conv(x)
    grads = torch.randn(1, 3, out.shape[2] * out.shape[3], 3, dtype=torch.float64)
    segment = conv_product(conv, [x], grads, {})
    assert isinstance(segment, ConvProduct) and not segment.shifted
    patches = unfolded(conv, x)
    expected = torch.einsum("bti,btj->ij", patches, patches)
    torch.testing.assert_close(segment.kron(KfacApprox.EXPAND)[1], expected, rtol=1e-12, atol=0)


class ShiftedNet(nn.Module):
    """Stride-1 convolutions of several geometries (each takes the shifted route when
    forced), a strided one (which cannot), and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1, dtype=ref.DTYPE)
        self.b = nn.Conv2d(2, 2, 3, dilation=2, padding=2, dtype=ref.DTYPE)
        self.c = nn.Conv2d(2, 2, (2, 3), padding=(0, 1), dtype=ref.DTYPE)
        self.d = nn.Conv2d(2, 2, 2, stride=2, dtype=ref.DTYPE)
        self.head = nn.Linear(8, 3, dtype=ref.DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.a(x))
        x = torch.tanh(self.b(x))
        x = torch.tanh(self.c(x))
        return self.head(self.d(x).flatten(1))


@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher"])
@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_fit_through_the_shifted_route_equals_the_reference(
    monkeypatch: pytest.MonkeyPatch, structure: str, kind: str
) -> None:
    force_shifted_route(monkeypatch)
    calls: list[int] = []

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return shifted_gram(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(conv_segments, "shifted_gram", counted)
    g = generator(3)
    model = ref.init_(ShiftedNet(), g, 0.6)
    x = torch.randn(7, 1, 5, 4, generator=g, dtype=ref.DTYPE)
    y = torch.randint(0, 3, (7,), generator=g)
    names = ref.trainable_names(model)
    expected = ref.reference_curvature(model, names, x, y, "classification", structure, kind)
    la = Laplace(model, "classification", structure=structure, curvature=kind, prior_precision=0.0)
    la.fit(ref.loader(x, y, 3), progress=False)
    got = la.posterior_precision.to_dense().detach()
    assert_close(got, expected, 1e-10)
    # the three stride-1 convolutions went through the shifted factor in all three batches
    # (a diagonal fit needs no factor: it goes through the shifted diagonal)
    # (once per batch: the call that sizes the accumulators keeps its factor for the first)
    assert len(calls) == (9 if structure == "kron" else 0)
