"""Export of the predictive as a self-contained ``torch.export`` program.

The program is traced from the same functions ``la.predict`` runs, so it gives the same
numbers, and it holds the model's weights and the posterior's factors as constants: plain
torch loads it with ``torch.export.load(path).module()`` without laplacefim. It returns a
dict of tensors named as the fields of :class:`~laplacefim.Prediction` (``probs``,
``logit_mean``, ``logit_var``; or ``mean``, ``epistemic_var``, ``aleatoric_var``,
``var``). The batch size is dynamic; every other input dimension is fixed to the example's.

* ``method="glm"``: the linearised predictive with the probit link. The program cannot
  hold a backward pass, so the posterior's parameters must give the model's output
  directly (a last-layer posterior, or any posterior of a single final layer): then the
  Jacobian rows are the layer's inputs.
* ``method="nn"``: the sampling predictive of ``n_samples`` fixed weight draws from
  the posterior (any subset, any structure); with the same generator it equals
  ``la.predict(x, method="nn", n_samples=n_samples, generator=...)``.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from laplacefim.config import CurvatureConfig, FitState, Hyperparameters
from laplacefim.fitting import eval_mode, make_engine
from laplacefim.inputs import batch_size
from laplacefim.options import Link
from laplacefim.prediction import Prediction
from laplacefim.predictive import chunk_moments
from laplacefim.structures.base import Precision


def _fields(prediction: Prediction) -> dict[str, Tensor]:
    """The prediction's tensors by field name (those that apply)."""
    values = {f.name: getattr(prediction, f.name) for f in fields(prediction)}
    return {name: value.detach() for name, value in values.items() if value is not None}


class GlmPredictive(nn.Module):
    """The linearised probit predictive of a posterior whose parameters give the output."""

    def __init__(
        self,
        model: nn.Module,
        config: CurvatureConfig,
        hyper: Hyperparameters,
        fit: FitState,
        precisions: list[Precision],
        example: object,
    ) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.noise = hyper.sigma_noise
        self.curvature = fit.curvature
        self.precisions = precisions
        self.engine = make_engine(model, config, fit.selection, hyper.sigma_noise)
        with eval_mode(model):
            self.engine.jacobian_rows(example, batch_size(example))
        if not self.engine.output_is_watched:
            raise ValueError(
                "method='glm' exports only posteriors whose parameters give the model's "
                "output directly (e.g. subset='last_layer' with the last layer's output "
                "returned as it is): here the Jacobian needs a backward pass through other "
                "layers, which an exported program cannot hold. Use method='nn'."
            )

    def forward(self, x: object) -> dict[str, Tensor]:
        mean, cov = chunk_moments(self.engine, self.curvature, self.precisions, x)
        prediction = self.config.likelihood.predictive(
            mean,
            cov,
            link=Link.PROBIT,
            noise=self.noise,
            n_samples=0,
            generator=None,
            joint_outputs=False,
        )
        return _fields(prediction)


class SampledPredictive(nn.Module):
    """The sampling predictive of fixed weight samples ``(S, P)`` of the chosen parameters."""

    weights: Tensor

    def __init__(
        self,
        model: nn.Module,
        config: CurvatureConfig,
        hyper: Hyperparameters,
        fit: FitState,
        weights: Tensor,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.noise = hyper.sigma_noise
        self.names = fit.selection.names
        self.shapes = [p.shape for p in fit.selection.params]
        self.register_buffer("weights", weights.to(fit.mean.dtype))
        self.dtype = dtype

    def forward(self, x: object) -> dict[str, Tensor]:
        likelihood, io = self.config.likelihood, self.config.io
        sizes = [shape.numel() for shape in self.shapes]
        outputs = []
        for weight in self.weights:
            parts = weight.split(sizes)
            params = {
                name: part.view(shape)
                for name, part, shape in zip(self.names, parts, self.shapes, strict=True)
            }
            outputs.append(likelihood.outputs(io.functional_call(self.model, params, x)))
        prediction = likelihood.sampled_predictive(
            torch.stack(outputs).to(self.dtype), noise=self.noise, joint_outputs=False
        )
        return _fields(prediction)


def _dynamic_batch(example: object) -> tuple[Any, ...]:
    """A dynamic batch dimension on every batched tensor of the example inputs."""
    batch = torch.export.Dim("batch")
    if isinstance(example, Tensor):
        return ({0: batch},)
    if isinstance(example, Mapping):
        return (
            {
                k: ({0: batch} if isinstance(v, Tensor) and v.ndim > 0 else None)
                for k, v in example.items()
            },
        )
    raise TypeError(
        f"example_inputs must be a tensor or a mapping of tensors, got {type(example).__name__}."
    )


def export_program(module: nn.Module, example: object, path: str | os.PathLike[str]) -> None:
    """Trace ``module`` on ``example`` with a dynamic batch and save the program to ``path``.

    Raises:
        ValueError: For an example of fewer than two inputs (a batch of one would be traced
            as a constant size).
        RuntimeError: With torch older than 2.3.
    """
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 3):
        raise RuntimeError(
            f"la.export needs torch >= 2.3 (non-strict torch.export); this is {torch.__version__}."
        )
    if batch_size(example) < 2:
        raise ValueError(
            "example_inputs must hold at least 2 inputs, so that the batch size is traced "
            "as dynamic."
        )
    with eval_mode(module), torch.no_grad():
        program = torch.export.export(
            module, (example,), dynamic_shapes=_dynamic_batch(example), strict=False
        )
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # constants that are views of one storage: harmless
        warnings.filterwarnings("ignore", message="No complete tensor found")
        torch.export.save(program, buffer)
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(buffer.getvalue())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
