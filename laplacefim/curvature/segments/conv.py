"""Convolution weights: ``Product`` over unfolded patches, with a cheaper input factor.

A ``k×k`` convolution's input factor ``A = Σ_{b,t} p_{bt} p_{bt}ᵀ`` over its patches ``p``
costs ``(C·k²)²`` per position when formed from the patches. With stride 1, its
``C×C`` block for kernel offsets ``(o_i, o_j)`` is a correlation of the input with itself
at the shift ``δ = o_j − o_i``, summed over the positions patch offset ``o_i`` reads:

    A_ij = Σ_b Σ_{u ∈ window(o_i)} x_u x_{u+δ}ᵀ = M_δ − Σ_{u ∉ window(o_i)} x_u x_{u+δ}ᵀ,

where ``M_δ`` sums over the whole image and the window misses only a few border rows and
columns. There are ``((2k−1)² + 1)/2`` shifts up to symmetry (13 for ``k = 3``), each one
``C × C`` product over the image, plus border strips: several times fewer operations than
the patch Gram where the image is large against the kernel, and no ``k²``-times larger
patch copy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from laplacefim.curvature.segments.base import Rotate, batch_chunks, cast, join, matmul
from laplacefim.curvature.segments.product import (
    SYMMETRIC_GRAM_MIN,
    SYMMETRIC_GRAM_MIN_ENTRIES,
    Product,
    ProductShape,
    _row_gram,
)
from laplacefim.options import KfacApprox

# The shifted products are C x C and the border strips many small calls: the shifted route
# is taken where it saves at least SHIFTED_GRAM_MARGIN in operations, on at least
# SHIFTED_GRAM_MIN_CHANNELS channels, and the patch Gram is worth at least
# SHIFTED_GRAM_MIN_COST multiply-adds. Measured on 2 CPU cores, a 3x3 convolution's factor
# on 64 inputs alone: 64 channels at 32x32 0.088 s against 0.142 s through the patches,
# 128 at 16x16 0.082 s against 0.116 s, 256 at 8x8 (1.95x fewer operations) 0.119 s
# against 0.111 s, 512 at 4x4 (1.3x) 0.215 s against 0.128 s; below 32 channels or a few
# milliseconds the patch Gram won. Inside a ResNet-18 fit the 256-channel layers still
# gained (no patch copy of 38 MB per batch; MC-Fisher KFAC 18.9 / 16.8 / 15.9 s against
# 22.3 / 19.4 / 25.4 s with them on the patches), hence the margin of 1.5. In a later slow
# spell of the same VM the shifted factor lost (64 channels at 32x32: 0.29-0.78 s against
# 0.20-0.30 s): its products have C x C outputs over long sums and are bound by memory
# bandwidth, the patch Gram by arithmetic. Re-measure these thresholds on quiet hardware.
# After the border corrections went from a gather and product per rectangle and shift to
# one row gather and batched product per shift: 64 at 32x32 0.121 s (was 0.148 in the same
# process), 128 at 16x16 0.109 (0.151), 256 at 8x8 0.158 (0.260), 512 at 4x4 0.296
# (0.445); inside the ResNet-18 MC-Fisher KFAC fit 16.8 / 18.3 / 16.7 s against 23.5 /
# 18.6 / 18.2 s with every layer on the patches.
SHIFTED_GRAM_MARGIN = 1.5
SHIFTED_GRAM_MIN_CHANNELS = 32
SHIFTED_GRAM_MIN_COST = 1 << 31
# The exact diagonal of a stride-1 convolution with at least this many output positions
# per call comes from shifted per-sample products (:func:`shifted_diagonal`), without
# patches. Measured on 2 CPU cores, a 3x3 layer's diagonal over 64 inputs, one column:
# 64 channels at 32x32 0.079-0.099 s against 0.103-0.111 s through the patches, 128 at
# 16x16 0.073-0.083 s against 0.086-0.104 s, 256 at 8x8 0.072-0.082 s against
# 0.105-0.119 s, 512 at 4x4 (16 positions) 0.37 s against 0.15-0.18 s. On few input
# channels the per-offset products are too thin: W2's 1- and 16-channel 8x8 layers made
# its exact-GGN diagonal fit slower (1.67 / 1.55 / 1.21 s through the patches against
# 2.06 / 1.66 / 2.08 s shifted), hence at least 32 input channels.
SHIFTED_DIAGONAL_MIN_POSITIONS = 64
SHIFTED_DIAGONAL_MIN_CHANNELS = 32


def patches(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``F.unfold``'s patches ``(B, T, C·kh·kw)``, gathered from a strided view of the
    padded input in one copy (2-3x faster than ``im2col`` on CPU for the convolutions of a
    ResNet, same values), laid out as a contiguous ``(C·kh·kw, B, T)``: the input factor's
    Gram matrix then reads them as one ``(d, B·T)`` matrix without another copy."""
    padding: Any = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros" or any(padding):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
    windows = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)
    windows = windows[..., ::dh, ::dw]  # (B, C, H_out, W_out, kh, kw)
    batch, channels, h_out, w_out = windows.shape[:4]
    patches = windows.permute(1, 4, 5, 0, 2, 3).reshape(channels * kh * kw, batch, h_out * w_out)
    return patches.permute(1, 2, 0)


@dataclass(frozen=True)
class Geometry:
    """Where a stride-1, zero-padded convolution reads its input.

    Attributes:
        kernel: ``(kh, kw)``.
        dilation: ``(dh, dw)``.
        before: Zero padding above and left of the image, ``(top, left)``.
        out: Output size ``(H_out, W_out)``.
    """

    kernel: tuple[int, int]
    dilation: tuple[int, int]
    before: tuple[int, int]
    out: tuple[int, int]

    @classmethod
    def of(cls, conv: nn.Conv2d, x: Tensor) -> Geometry | None:
        """The geometry where the shifted input factor applies (stride 1, zero padding,
        one group), else None."""
        if conv.stride != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
            return None
        left, right, top, bottom = conv._reversed_padding_repeated_twice
        (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
        h, w = x.shape[-2:]
        out = (h + top + bottom - (kh - 1) * dh, w + left + right - (kw - 1) * dw)
        return cls((kh, kw), (dh, dw), (top, left), out)

    @property
    def positions(self) -> int:
        """Output positions ``H_out·W_out``."""
        return self.out[0] * self.out[1]

    def offsets(self) -> list[tuple[int, int]]:
        """The kernel's offsets in patch order (row-major over ``kh, kw``)."""
        (kh, kw), (dh, dw) = self.kernel, self.dilation
        return [(a * dh, b * dw) for a in range(kh) for b in range(kw)]

    def frame(self, size: tuple[int, int]) -> tuple[int, int]:
        """The zero frame an ``(H, W)`` image sits in: one kernel span more each way."""
        return size[0] + (self.kernel[0] - 1) * self.dilation[0], size[1] + (
            self.kernel[1] - 1
        ) * self.dilation[1]

    def border(self, size: tuple[int, int]) -> tuple[list[tuple[slice, slice]], list[list[bool]]]:
        """The pixels some offset's window misses, as rectangles that every offset misses
        whole or not at all (rows × columns of the image), and for each offset which
        rectangles it misses."""
        runs = []
        for axis in range(2):
            n, before, length = size[axis], self.before[axis], self.out[axis]
            keys = [
                tuple(not 0 <= r - (o[axis] - before) < length for o in self.offsets())
                for r in range(n)
            ]
            starts = [r for r in range(n) if r == 0 or keys[r] != keys[r - 1]]
            runs.append(
                [(slice(a, b), keys[a]) for a, b in zip(starts, [*starts[1:], n], strict=True)]
            )
        rectangles, missed = [], []
        for rows, row_key in runs[0]:
            for cols, col_key in runs[1]:
                key = [a or b for a, b in zip(row_key, col_key, strict=True)]
                if any(key):
                    rectangles.append((rows, cols))
                    missed.append(key)
        return rectangles, [list(m) for m in zip(*missed, strict=True)]

    def shifts(self) -> list[tuple[int, int]]:
        """The differences ``o_j − o_i`` that are zero or come first in row-major order."""
        offsets = self.offsets()
        found = {(b[0] - a[0], b[1] - a[1]) for a in offsets for b in offsets}
        return sorted(d for d in found if d >= (0, 0))

    def shifted_cost(self, channels: int, batch: int, size: tuple[int, int]) -> int:
        """Multiply-adds of :func:`shifted_gram`."""
        height, width = self.frame(size)
        rectangles = self.border(size)[0]
        border = sum((r.stop - r.start) * (c.stop - c.start) for r, c in rectangles)
        return len(self.shifts()) * channels**2 * batch * (height * width + border)


def shifted_gram(x: Tensor, geometry: Geometry, into: Tensor | None = None) -> Tensor:
    """The input factor ``Σ_{b,t} p_{bt} p_{bt}ᵀ`` of the patches of ``x (B, C, H, W)``,
    ``(C·kh·kw, C·kh·kw)`` in patch order, from shifted products of ``x`` with itself
    (added to ``into`` in place if given).

    The image sits at the top left of a zero frame ``(H + kh_span − 1, W + kw_span − 1)``
    laid out flat, pixel after pixel (channels last), with zeros after the last image:
    shifting the flat index by ``δ_y·width + δ_x`` then pairs each pixel with its neighbour
    at ``δ`` or with a zero, never with a pixel across a row or image border, so every
    ``M_δ`` is one matrix product of two strided views, without copies. The border pixels
    some offsets miss are gathered once; per shift, their partners are one row gather and
    the rectangles' products one batched product per rectangle size.
    """
    batch, channels, h, w = x.shape
    height, width = geometry.frame((h, w))
    n = batch * height * width
    offsets = geometry.offsets()
    longest = offsets[-1][0] * width + offsets[-1][1]
    flat = x.new_zeros(n + longest, channels)
    flat[:n].view(batch, height, width, channels)[:, :h, :w] = x.permute(0, 2, 3, 1)
    border = _Border.of(geometry, (h, w), (batch, height, width), flat)
    index = {o: i for i, o in enumerate(offsets)}
    k = len(offsets)
    blocks = x.new_empty(k, k, channels, channels)  # (offset, offset, channel, channel)
    for dy, dx in geometry.shifts():
        step = dy * width + dx
        whole = flat[:n].T @ flat[step : step + n]
        corrections = None if border is None else border.corrections(flat, step)
        for i, o in enumerate(offsets):
            j = index.get((o[0] + dy, o[1] + dx))
            if j is None:
                continue
            if corrections is None:
                blocks[i, j] = whole
            else:
                torch.sub(whole, corrections[i], out=blocks[i, j])
            if i != j:
                blocks[j, i] = blocks[i, j].T
    laid = blocks.permute(2, 0, 3, 1)  # rows and columns (channel, offset): patch order
    if into is None:
        return laid.reshape(channels * k, channels * k)
    into.view(channels, k, channels, k).add_(laid)
    return into


@functools.lru_cache(maxsize=256)
def _missed_mask(
    geometry: Geometry,
    size: tuple[int, int],
    order: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """``(k, R)``: 1 where offset ``i`` misses border rectangle ``order[r]``. Cached: a
    tensor made from a Python list is a host-to-device copy (a sync on CUDA) per call."""
    _, missed = geometry.border(size)
    rows = [[float(m[r]) for r in order] for m in missed]
    return torch.tensor(rows, dtype=dtype, device=device)


@dataclass
class _Border:
    """The border rectangles of :meth:`Geometry.border` over a batch laid out flat, grouped
    by size: the pixels' flat positions, their values, and which offsets miss each one."""

    positions: list[Tensor]  # per group (R_g, n_g) flat positions
    values: list[Tensor]  # per group (R_g, n_g, C)
    missed: Tensor  # (k, R) 0/1, rectangles in group order

    @classmethod
    def of(
        cls,
        geometry: Geometry,
        size: tuple[int, int],
        frame: tuple[int, int, int],
        flat: Tensor,
    ) -> _Border | None:
        """None where no offset misses a pixel."""
        rectangles, _ = geometry.border(size)
        if not rectangles:
            return None
        grid = torch.arange(frame[0] * frame[1] * frame[2], device=flat.device).view(frame)
        found = [grid[:, rows, cols].reshape(-1) for rows, cols in rectangles]
        groups: dict[int, list[int]] = {}
        for r, pixels in enumerate(found):
            groups.setdefault(pixels.numel(), []).append(r)
        order = tuple(r for members in groups.values() for r in members)
        positions = [torch.stack([found[r] for r in members]) for members in groups.values()]
        values = [flat[p] for p in positions]
        mask = _missed_mask(geometry, size, order, flat.dtype, flat.device)
        return cls(positions, values, mask)

    def corrections(self, flat: Tensor, step: int) -> Tensor:
        """Per offset, ``Σ x_u x_{u+step}ᵀ`` over the border pixels it misses: ``(k, C, C)``."""
        channels = flat.shape[1]
        strips = [
            torch.bmm(here.transpose(1, 2), flat[positions + step])
            for here, positions in zip(self.values, self.positions, strict=True)
        ]
        products = torch.cat(strips).reshape(len(self.missed[0]), -1)
        return (self.missed @ products).view(-1, channels, channels)


def shifted_diagonal(
    images: tuple[Tensor, ...],
    geometries: tuple[Geometry, ...],
    grads: Tensor,
    padding: tuple[int, ...],
) -> Tensor:
    """The exact diagonal ``Σ_{v,b} u²`` of a stride-1 convolution's weight, ``(d_out, C, k)``
    in flat order, from its output gradients ``(V, B, T, d_out)`` (the calls' positions one
    after another) and inputs, without patches.

    Each image is zero-padded (``padding`` as ``F.pad`` takes it) and laid out flat, and
    each call's output gradients sit in a frame as wide as the padded image (zeros in the
    extra columns): kernel offset ``(o_y, o_x)`` then reads the image at the flat shift
    ``o_y·width + o_x``, so the per-sample gradients of one offset are one batched product
    of the framed gradients with a strided view of the image — a ``C``-wide slice of the
    per-sample gradients at a time, squared and summed before the next, for a chunk of
    data at a time.
    """
    n_columns, batch, _, d_out = grads.shape
    channels = images[0].shape[1]
    offsets = geometries[0].offsets()
    framed = []  # per call: (framed gradients (B, V·d_out, L), flat image, width)
    start = 0
    for x, geometry in zip(images, geometries, strict=True):
        padded = F.pad(x, padding) if any(padding) else x.contiguous()
        height, width = padded.shape[-2:]
        h_out, w_out = geometry.out
        g = grads[:, :, start : start + geometry.positions]
        g = g.reshape(n_columns, batch, h_out, w_out, d_out)
        start += geometry.positions
        frame = grads.new_zeros(batch, n_columns, d_out, h_out, width)
        frame[..., :w_out] = g.permute(1, 0, 4, 2, 3)
        length = (h_out - 1) * width + w_out
        left = frame.view(batch, n_columns * d_out, h_out * width)[:, :, :length]
        framed.append((left, padded.reshape(batch, channels, height * width), width, length))
    total = grads.new_zeros(n_columns * d_out, channels, len(offsets))
    step = batch_chunks(n_columns, batch, d_out * channels)
    for k, (oy, ox) in enumerate(offsets):
        for lo in range(0, batch, step):
            part = None
            for left, flat, width, length in framed:
                shift = oy * width + ox
                right = flat[lo : lo + step, :, shift : shift + length].transpose(1, 2)
                if part is None:
                    part = torch.bmm(left[lo : lo + step], right)
                else:
                    part.baddbmm_(left[lo : lo + step], right)
            total[:, :, k] += part.square_().sum(0)  # type: ignore[union-attr]
    return total.view(n_columns, d_out, -1).sum(0)


def patch_gram_cost(d: int, rows: int) -> float:
    """Multiply-adds of the patch route's input factor (:func:`symmetric_gram`)."""
    blocked = d >= SYMMETRIC_GRAM_MIN and d * rows >= SYMMETRIC_GRAM_MIN_ENTRIES
    return d * d * rows * (10 / 16 if blocked else 1.0)


@dataclass(frozen=True)
class ConvProduct(ProductShape):
    """A convolution's weight as a :class:`Product` over its patches, unfolded only when
    asked for; its Kronecker input factor comes from :func:`shifted_gram` where it has
    ``geometries``, and is added to a running total in place by :meth:`kron_into`.

    Attributes:
        conv: The layer (its kernel, stride, padding and dilation).
        images: Its ``(B, C, H, W)`` input in each call of the forward.
        grads: ``(V, B, T, d_out)`` output gradients, the calls stacked as positions.
        geometries: Where each call reads its input (stride 1, zero padding, one group);
            None where a call is not such a convolution.
        shifted: Whether the input factor comes from shifted products (needs
            ``geometries``), else from the patch Gram.
        shared: Scratch space shared with the layer's bias (the output factor).
    """

    conv: nn.Conv2d = field(compare=False)
    images: tuple[Tensor, ...]
    grads: Tensor
    geometries: tuple[Geometry, ...] | None
    shifted: bool
    shared: dict[object, Tensor] = field(default_factory=dict, compare=False, repr=False)

    @property
    def patched(self) -> Product:
        """The same segment with its patches unfolded, afresh on every call: kept on the
        segment, they would outlive the batch in a multi-pass fit's segment cache,
        ``C·k²/C`` times larger than the images it budgets for."""
        inputs = join([patches(self.conv, x) for x in self.images], 1)
        return Product(inputs, self.grads, False, self.shared)

    @property
    def d_in(self) -> int:
        """Patch size ``C·kh·kw``."""
        kh, kw = self.conv.kernel_size
        return self.images[0].shape[1] * kh * kw

    def to(self, dtype: torch.dtype, memo: dict[int, Tensor]) -> ConvProduct:
        """Cast to ``dtype``."""
        images = tuple(cast(x, dtype, memo) for x in self.images)
        grads = cast(self.grads, dtype, memo)
        return ConvProduct(self.conv, images, grads, self.geometries, self.shifted, self.shared)

    def _input_factor(self, into: Tensor | None = None) -> Tensor:
        """``A`` over the calls (added to ``into`` if given)."""
        if not self.shifted or self.geometries is None:
            return _row_gram(self.patched.inputs, into)  # type: ignore[arg-type]
        pairs = zip(self.images, self.geometries, strict=True)
        if into is None:
            x, geometry = next(pairs)
            into = shifted_gram(x, geometry)
        for x, geometry in pairs:
            shifted_gram(x, geometry, into)
        return into

    @property
    def _factor_key(self) -> tuple[object, ...]:
        """Where :meth:`kron` keeps the batch's input factor in ``shared``."""
        return ("A", id(self.images[0]), "conv")

    def kron(self, approx: KfacApprox, *, inputs: bool = True) -> list[Tensor | None]:
        """:meth:`Product.kron` (the weight's input factor is its own, never shared; kept in
        ``shared`` for the batch, as :class:`Product` keeps its factors)."""
        first = self._output_factor(approx)
        if not inputs:
            return [first, None, None]
        if approx is KfacApprox.REDUCE:
            return self.patched.kron(approx)
        if self._factor_key not in self.shared:
            self.shared[self._factor_key] = self._input_factor()
        count = self.grads.new_full((), float(self.batch * self.positions))
        return [first, self.shared[self._factor_key], count]

    def _output_factor(self, approx: KfacApprox) -> Tensor:
        """``G``, shared with the layer's bias."""
        return Product(None, self.grads, False, self.shared).kron(approx)[0]  # type: ignore[return-value]

    def kron_into(self, approx: KfacApprox, totals: list[Tensor], *, inputs: bool = True) -> bool:
        """Add :meth:`kron` to running totals ``[first, second, count]`` in place, forming
        no fresh input factor; False (nothing added) where it cannot."""
        first, second, count = totals
        if not inputs:
            first.add_(self._output_factor(approx))
            return True
        if approx is KfacApprox.REDUCE or second.ndim != 2 or second.dtype != self.grads.dtype:
            return False
        first.add_(self._output_factor(approx))
        formed = self.shared.get(self._factor_key)  # by kron() this batch
        if formed is None:
            self._input_factor(second)
        else:
            second.add_(formed)
        count.add_(self.batch * self.positions)
        return True

    def per_sample(self) -> Tensor:
        """``u (V, B, size)``."""
        return self.patched.per_sample()

    def diag(self) -> Tensor:
        """Exact diagonal: from shifted per-sample products where every call has at least
        ``SHIFTED_DIAGONAL_MIN_POSITIONS`` output positions and the input at least
        ``SHIFTED_DIAGONAL_MIN_CHANNELS`` channels, else through the patches."""
        geometries = self.geometries
        if (
            geometries is None
            or self.images[0].shape[1] < SHIFTED_DIAGONAL_MIN_CHANNELS
            or min(g.positions for g in geometries) < SHIFTED_DIAGONAL_MIN_POSITIONS
        ):
            return self.patched.diag()
        padding = tuple(self.conv._reversed_padding_repeated_twice)
        return shifted_diagonal(self.images, geometries, self.grads, padding).reshape(-1)

    def rotated(
        self, first: Tensor | None, second: Tensor | None, rotate: Rotate = matmul
    ) -> Product:
        """Rotate ``g`` and the patches into the eigenbases of their factors."""
        return self.patched.rotated(first, second, rotate)

    def gram(self, weights: Tensor) -> Tensor:
        """``(B, V, V)`` weighted Gram matrices."""
        return self.patched.gram(weights)

    def gram_diagonal(self, weights: Tensor) -> Tensor:
        """``(B, V)``: the diagonal of :meth:`gram`."""
        return self.patched.gram_diagonal(weights)

    def dots(self, vectors: Tensor) -> Tensor:
        """``uᵀX``: ``(V, B, k)``."""
        return self.patched.dots(vectors)

    def combine(self, coefficients: Tensor) -> Tensor:
        """``Σ c u``: ``(k, size)``."""
        return self.patched.combine(coefficients)

    def total(self) -> Tensor:
        """``Σ_b u``: ``(V, size)``."""
        return self.patched.total()

    def tensors(self) -> list[Tensor]:
        """The tensors the segment holds."""
        return [*self.images, self.grads]


def conv_product(
    conv: nn.Conv2d, images: list[Tensor], grads: Tensor, shared: dict[object, Tensor]
) -> ConvProduct | Product:
    """The weight segment of a ``groups=1`` convolution: a :class:`ConvProduct`, shifted
    where that input factor is the cheaper route (see ``SHIFTED_GRAM_MARGIN``); a
    :class:`Product` over the patches where the output is a single pixel."""
    if grads.shape[2] == 1:  # one position: a linear layer's product (see structures.full)
        return Product(join([patches(conv, x) for x in images], 1), grads, False, shared)
    found = [Geometry.of(conv, x) for x in images]
    geometries = None if None in found else tuple(g for g in found if g is not None)
    channels = images[0].shape[1]
    d = channels * conv.kernel_size[0] * conv.kernel_size[1]
    patch_cost = patch_gram_cost(d, grads.shape[1] * grads.shape[2])
    shifted = (
        geometries is not None
        and channels >= SHIFTED_GRAM_MIN_CHANNELS
        and patch_cost >= SHIFTED_GRAM_MIN_COST
        and SHIFTED_GRAM_MARGIN
        * sum(
            g.shifted_cost(channels, x.shape[0], (x.shape[2], x.shape[3]))
            for g, x in zip(geometries, images, strict=True)
        )
        < patch_cost
    )
    return ConvProduct(conv, tuple(images), grads, geometries, shifted, shared)
