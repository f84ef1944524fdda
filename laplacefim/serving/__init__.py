"""Serving a posterior: a batched, thread-safe predictor with uncertainty scores and an
abstention rule, an HTTP server (``laplacefim serve``, extra ``serve``) and an export of
the predictive that plain torch runs (``la.export``). See ``docs/serving.md``."""

from laplacefim.serving.abstention import AbstentionReport, AbstentionRule
from laplacefim.serving.predictor import InputError, InputResult, Predictor
from laplacefim.serving.scores import BatchScores, Score

__all__ = [
    "AbstentionReport",
    "AbstentionRule",
    "BatchScores",
    "InputError",
    "InputResult",
    "Predictor",
    "Score",
]
