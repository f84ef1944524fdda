"""The convolution rule's patches equal ``F.unfold``'s for every stride, dilation, padding
and padding mode (the rule gathers them from a strided view instead of ``im2col``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from laplacefim.curvature.segments.conv import patches as _patches

CASES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(2, 3), stride=(2, 1), padding=(0, 2)),
    dict(kernel_size=3, dilation=2, padding=2),
    dict(kernel_size=(3, 2), dilation=(1, 3), stride=(1, 2)),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=4, padding="same"),
    dict(kernel_size=3, padding="valid"),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding=(2, 1), padding_mode="circular"),
    dict(kernel_size=3, padding=1, padding_mode="replicate", stride=3),
]


def _reference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``F.unfold`` of the input padded as the convolution pads it."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros" or any(conv.padding):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    return F.unfold(x, conv.kernel_size, conv.dilation, 0, conv.stride).transpose(1, 2)


@pytest.mark.parametrize("options", CASES, ids=[str(c) for c in CASES])
def test_patches_equal_unfold(options: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **options).double()
    x = torch.randn(5, 3, 11, 9, dtype=torch.float64)
    patches = _patches(conv, x)
    expected = _reference(conv, x)
    assert patches.shape == expected.shape
    assert torch.equal(patches, expected)
    # the layout the input factor's Gram reads without a copy: a contiguous (d, B, T)
    assert patches.permute(2, 0, 1).is_contiguous()
    # and the patches times the weight are the convolution itself
    out = patches @ conv.weight.reshape(4, -1).T + conv.bias
    ref = conv(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
