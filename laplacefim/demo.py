"""``laplacefim demo``: MAP against three Laplace posteriors on scikit-learn's digits.

A small MLP is trained on the bundled 8×8 digits (no download). Three posteriors are
fitted around it — last-layer KFAC, all-weights KFAC and all-weights diagonal, each with
its prior precision tuned by marginal likelihood — and MAP and each GLM probit predictive
are scored on the clean test split, on test digits rotated by 15° … 60°, and on two
out-of-distribution sets (uniform-noise images and pixel-shuffled test digits).
Everything is seeded through local ``torch.Generator`` objects; the global random state
is never touched.

Example:
    >>> result = run_demo(DemoConfig.quick())
    >>> result.report["metrics"]["all_kron"]["rot45"]["nll"]
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from laplacefim.evaluation import (
    REPORT_SCHEMA,
    MethodSpec,
    classification_scores,
    fit_posterior,
    laplace_probs,
    map_probs,
    ood_scores,
    versions,
)
from laplacefim.metrics import ReliabilityDiagram, reliability

IMAGE_SIDE = 8
"""The digits are 8x8 grey images with values 0…16, scaled here to [0, 1]."""

N_CLASSES = 10

DEMO_METHODS = (
    MethodSpec("last_layer_kron", "LL-KFAC", subset="last_layer", structure="kron"),
    MethodSpec("all_kron", "KFAC", subset="all", structure="kron"),
    MethodSpec("all_diag", "Diag", subset="all", structure="diag"),
)
"""The posteriors the demo fits, all on the exact GGN."""


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo; the defaults are the full demo, :meth:`quick` a tiny one.

    Attributes:
        seed: Seeds the split, the initialisation, the batch order and the OOD noise.
        hidden: Width of the MLP's two hidden layers (``64-h-h-10``).
        epochs: Training epochs (Adam).
        n_train: Training digits (stratified; the test split is the rest).
        n_test: Test digits used, at most the rest; None for all of them.
        batch_size: Training batch size.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        angles: Rotation angles in degrees; 0 is the clean test split.
        fit_batch_size: Batch size of the curvature fit.
    """

    seed: int = 0
    hidden: int = 128
    epochs: int = 30
    n_train: int = 1400
    n_test: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    angles: tuple[float, ...] = (0.0, 15.0, 30.0, 45.0, 60.0)
    fit_batch_size: int = 256
    methods: tuple[MethodSpec, ...] = field(default=DEMO_METHODS)

    @classmethod
    def quick(cls, seed: int = 0) -> DemoConfig:
        """A tiny setting for tests: 300 training and 100 test digits, a 32-wide MLP."""
        return cls(seed=seed, hidden=32, epochs=10, n_train=300, n_test=100, batch_size=64, lr=1e-2)

    def __post_init__(self) -> None:
        if not 0 < self.n_train < 1797:
            raise ValueError(
                f"n_train must be in [1, 1796] (digits has 1797 images), got {self.n_train}."
            )
        if self.n_test is not None and self.n_test < 1:
            raise ValueError(f"n_test must be >= 1 or None, got {self.n_test}.")
        if not self.angles or 0.0 not in self.angles:
            raise ValueError(f"angles must include 0 (the clean test split), got {self.angles}.")
        for name in ("hidden", "epochs", "batch_size", "fit_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")


@dataclass(frozen=True)
class Digits:
    """The digits split: images ``(N, 64)`` in [0, 1] (float32), labels ``(N,)`` (int64)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced.

    Attributes:
        report: The JSON-ready report (schema in docs/cli.md).
        reliability: Clean-test reliability diagram per method label.
    """

    report: dict[str, Any]
    reliability: dict[str, ReliabilityDiagram]


def load_digits_split(seed: int, n_train: int, n_test: int | None = None) -> Digits:
    """scikit-learn's bundled digits, scaled to [0, 1] and split stratified by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X / 16.0, y, train_size=n_train, random_state=seed, stratify=y
    )
    if n_test is not None:
        X_test, y_test = X_test[:n_test], y_test[:n_test]
    return Digits(
        torch.tensor(X_train, dtype=torch.float32),
        torch.tensor(y_train, dtype=torch.int64),
        torch.tensor(X_test, dtype=torch.float32),
        torch.tensor(y_test, dtype=torch.int64),
    )


def rotate(images: Tensor, degrees: float) -> Tensor:
    """Rotate flattened square images about their centre (bilinear, zero padding).

    Args:
        images: Images ``(B, S*S)`` or ``(B, S, S)``.
        degrees: Counter-clockwise angle.

    Returns:
        Rotated images of the input's shape.
    """
    side = math.isqrt(images[0].numel())
    if side * side != images[0].numel():
        raise ValueError(f"images must be square, got {images[0].numel()} pixels per image.")
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    affine = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=images.dtype, device=images.device)
    batch = images.reshape(-1, 1, side, side)
    grid = F.affine_grid(affine.expand(len(batch), 2, 3), list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(images.shape)


def noise_images(n: int, n_pixels: int, generator: torch.Generator) -> Tensor:
    """Uniform-noise images in [0, 1], ``(n, n_pixels)``."""
    return torch.rand((n, n_pixels), generator=generator)


def shuffle_pixels(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each image's pixels in its own random order: digit statistics, no digit shape."""
    order = torch.rand(images.shape, generator=generator).argsort(dim=1)
    return images.gather(1, order)


def make_mlp(hidden: int, generator: torch.Generator) -> nn.Sequential:
    """An MLP ``64-h-h-10`` with PyTorch's default initialisation, drawn from ``generator``."""
    model = nn.Sequential(
        nn.Linear(IMAGE_SIDE**2, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, N_CLASSES),
    )
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
    return model


def train(
    model: nn.Module,
    data: Digits,
    config: DemoConfig,
    generator: torch.Generator,
    *,
    progress: bool,
) -> None:
    """Adam on the mean cross-entropy, shuffled batches drawn from ``generator``."""
    loader = DataLoader(
        TensorDataset(data.x_train, data.y_train),
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    model.train()
    for _ in tqdm(
        range(config.epochs), desc="train MLP", unit="epoch", disable=not progress, file=sys.stderr
    ):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()


def shift_name(angle: float) -> str:
    """``"clean"`` for 0°, else ``"rot<angle>"`` (e.g. ``"rot15"``)."""
    return "clean" if angle == 0 else f"rot{angle:g}"


def run_demo(config: DemoConfig | None = None, *, progress: bool | None = None) -> DemoResult:
    """Train, fit, tune and evaluate; return the report and the clean reliability diagrams.

    Args:
        config: Settings; the full demo by default.
        progress: Progress bars on stderr; None shows them only on a terminal.

    Returns:
        The :class:`DemoResult`.
    """
    config = config or DemoConfig()
    show = sys.stderr.isatty() if progress is None else progress
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    data = load_digits_split(config.seed, config.n_train, config.n_test)
    model = make_mlp(config.hidden, generator)
    timings: dict[str, Any] = {"data_s": time.perf_counter() - start}

    tick = time.perf_counter()
    train(model, data, config, generator, progress=show)
    timings["train_s"] = time.perf_counter() - tick

    shifts = {
        shift_name(a): (data.x_test if a == 0 else rotate(data.x_test, a)) for a in config.angles
    }
    ood_sets = {
        "noise": noise_images(len(data.x_test), IMAGE_SIDE**2, generator),
        "shuffled": shuffle_pixels(data.x_test, generator),
    }
    inputs = {**shifts, **ood_sets}

    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=config.fit_batch_size)
    probs: dict[str, dict[str, Tensor]] = {}
    methods: dict[str, dict[str, Any]] = {
        "map": {
            "label": "MAP",
            "predictive": "softmax",
            "n_params": sum(p.numel() for p in model.parameters()),
        },
    }
    method_times: dict[str, dict[str, float]] = {}
    tick = time.perf_counter()
    probs["map"] = {key: map_probs(model, x, "classification") for key, x in inputs.items()}
    method_times["map"] = {"predict_s": time.perf_counter() - tick}
    for spec in config.methods:
        fitted = fit_posterior(model, loader, "classification", spec, progress=show)
        methods[spec.name] = fitted.info
        tick = time.perf_counter()
        bar = tqdm(
            inputs.items(),
            desc=f"predict {spec.label}",
            unit="set",
            disable=not show,
            file=sys.stderr,
        )
        probs[spec.name] = {key: laplace_probs(fitted.laplace, x) for key, x in bar}
        method_times[spec.name] = {
            "fit_s": fitted.fit_s,
            "tune_s": fitted.tune_s,
            "predict_s": time.perf_counter() - tick,
        }

    y = data.y_test
    metrics = {
        name: {shift: classification_scores(p[shift], y) for shift in shifts}
        for name, p in probs.items()
    }
    ood = {
        name: {key: ood_scores(p["clean"], p[key]) for key in ood_sets} for name, p in probs.items()
    }
    diagrams = {methods[name]["label"]: reliability(p["clean"], y) for name, p in probs.items()}
    timings["methods"] = method_times
    timings["total_s"] = time.perf_counter() - start

    width = config.hidden
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "command": "demo",
        "task": "classification",
        "target": "classification",
        "title": (
            f"laplacefim demo: MLP 64-{width}-{width}-10 on digits "
            f"({len(data.x_train)} train / {len(data.x_test)} test, seed {config.seed})"
        ),
        "config": {k: v for k, v in asdict(config).items() if k != "methods"},
        "data": {
            "name": "scikit-learn digits (8x8, scaled to [0, 1])",
            "n_train": len(data.x_train),
            "n_test": len(data.x_test),
            "input_shape": [IMAGE_SIDE**2],
            "n_classes": N_CLASSES,
        },
        "model": {
            "architecture": f"MLP 64-{width}-{width}-10 (ReLU)",
            "n_params": methods["map"]["n_params"],
        },
        "methods": methods,
        "shifts": {shift_name(a): {"rotation_deg": float(a), "n": len(y)} for a in config.angles},
        "ood_sets": {
            "noise": {"n": len(ood_sets["noise"]), "description": "uniform noise images in [0, 1]"},
            "shuffled": {
                "n": len(ood_sets["shuffled"]),
                "description": "test digits with their pixels randomly permuted",
            },
        },
        "ood_reference": "clean",
        "metrics": metrics,
        "ood": ood,
        "timings": timings,
        "versions": versions(),
    }
    return DemoResult(report, diagrams)


def write_plots(result: DemoResult, out_dir: str | Path) -> dict[str, str]:
    """Write ``reliability.png`` (clean test) and ``shift_curves.png`` into ``out_dir``.

    Returns:
        File names by plot, relative to ``out_dir``.

    Raises:
        ModuleNotFoundError: If matplotlib is not installed.
    """
    from laplacefim import plots

    report = result.report
    folder = Path(out_dir)
    plots.reliability_diagram(
        result.reliability, folder / "reliability.png", title="Reliability on the clean test digits"
    )
    table = {
        spec["label"]: {
            report["shifts"][shift]["rotation_deg"]: values
            for shift, values in report["metrics"][name].items()
        }
        for name, spec in report["methods"].items()
    }
    plots.shift_curves(
        table, folder / "shift_curves.png", ("accuracy", "nll", "ece"), title="Rotated test digits"
    )
    return {"reliability": "reliability.png", "shift_curves": "shift_curves.png"}


__all__ = [
    "DEMO_METHODS",
    "DemoConfig",
    "DemoResult",
    "Digits",
    "load_digits_split",
    "make_mlp",
    "noise_images",
    "rotate",
    "run_demo",
    "shift_name",
    "shuffle_pixels",
    "train",
    "write_plots",
]
