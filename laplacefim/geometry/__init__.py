"""Fisher geometry: matrix-free GGN / Hessian products, spectra, traces, distances.

Data enter as in :class:`~laplacefim.Laplace`: a model, a loader of ``(inputs, targets)``
batches and a likelihood name; the loss is the sum of the per-datum negative
log-likelihoods. Parameter settings and vectors are flat ``(P,)`` tensors of the chosen
trainable parameters in ``model.named_parameters()`` order (each tensor row-major),
the layout of ``Laplace.mean``. See ``docs/geometry.md``.
"""

from laplacefim.geometry.distance import fisher_distance, predictive_kl
from laplacefim.geometry.operator import (
    CurvatureOperator,
    Matrix,
    ggn_vector_product,
    hessian_vector_product,
)
from laplacefim.geometry.sensitivity import LayerSensitivity, layer_sensitivity
from laplacefim.geometry.spectrum import (
    Eigen,
    SpectralDensity,
    Which,
    plot_spectral_density,
    spectral_density,
    structure_eigenvalues,
    top_eigenvalues,
)
from laplacefim.geometry.trace import (
    TraceEstimate,
    effective_dimension,
    structure_trace,
    trace,
)

__all__ = [
    "CurvatureOperator",
    "Eigen",
    "LayerSensitivity",
    "Matrix",
    "SpectralDensity",
    "TraceEstimate",
    "Which",
    "effective_dimension",
    "fisher_distance",
    "ggn_vector_product",
    "hessian_vector_product",
    "layer_sensitivity",
    "plot_spectral_density",
    "predictive_kl",
    "spectral_density",
    "structure_eigenvalues",
    "structure_trace",
    "top_eigenvalues",
    "trace",
]
