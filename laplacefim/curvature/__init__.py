"""The curvature engine: per-layer statistics of the GGN, the MC Fisher and the empirical Fisher."""

from laplacefim.curvature.engine import CurvatureEngine

__all__ = ["CurvatureEngine"]
