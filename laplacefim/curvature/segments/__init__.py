"""Segments: per-sample gradients in factorised form (see :mod:`.base`)."""

from laplacefim.curvature.segments.base import Segment, cast, join
from laplacefim.curvature.segments.product import Product
from laplacefim.curvature.segments.samples import Samples
from laplacefim.curvature.segments.tokens import Tokens

__all__ = ["Product", "Samples", "Segment", "Tokens", "cast", "join"]
