"""The curvature engine: per-parameter segments of the GGN, the MC Fisher and the empirical
Fisher, from one forward and one batched backward per batch."""

from laplacefim.curvature.engine import BatchRows, CurvatureEngine, Slot

__all__ = ["BatchRows", "CurvatureEngine", "Slot"]
