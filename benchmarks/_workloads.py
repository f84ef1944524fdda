"""Benchmark workloads: data, models, training and the fit-data loader.

Every workload uses scikit-learn's bundled digits (8x8 grey images, 10 classes),
so nothing is downloaded. For W1 and W2 the first 1,400 rows of a seeded permutation
train the model; that train split, repeated 4 times with N(0, 0.01^2) noise added, is
the 5,600-row data set every library fits its curvature on (batch 128, no shuffle).
W3, a ResNet-18 (``_resnet.py``), sees the digits as tinted 3x32x32 images; it trains
on the first 256 train rows and fits on the same 256 rows (batch 64, no repeats).

A *bundle* (a ``torch.save`` file) carries the fit data and the trained weights
from the orchestrating process to the per-configuration worker processes, so
all of them measure exactly the same model and data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from _resnet import colour_images, resnet18
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SEED = 0
N_TRAIN = 1_400
FIT_REPEATS = 4
FIT_NOISE_STD = 0.01
BATCH_SIZE = 128
TRAIN_EPOCHS = 10
TRAIN_BATCH = 64
TRAIN_LR = 1e-3

WORKLOADS: dict[str, str] = {
    "W1": "MLP 64-256-256-10 (ReLU), digits",
    "W2": "CNN conv16-conv32-linear, digits 1x8x8",
    "W3": "ResNet-18 (BatchNorm, residual blocks), digits as tinted 3x32x32 images",
}
W3_ROWS = 256  # W3 trains and fits on this many rows ...
W3_BATCH = 64  # ... in batches of this size


def batch_size(workload: str) -> int:
    """The fit loader's batch size."""
    return W3_BATCH if workload == "W3" else BATCH_SIZE


@dataclass(frozen=True)
class Bundle:
    """Everything a worker needs to rebuild a workload."""

    workload: str
    X: torch.Tensor
    y: torch.Tensor
    state_dict: dict[str, torch.Tensor]
    train_accuracy: float
    test_accuracy: float


def build_model(workload: str) -> nn.Sequential:
    """Return the untrained model of ``workload`` (its last module is the head)."""
    if workload == "W1":
        return nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
    if workload == "W2":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, 10),
        )
    if workload == "W3":
        return resnet18()
    raise ValueError(f"unknown workload {workload!r}; choose from {sorted(WORKLOADS)}")


def split_head(model: nn.Sequential) -> tuple[nn.Module, nn.Linear]:
    """Split ``model`` into the feature extractor and its last linear layer."""
    head = model[-1]
    if not isinstance(head, nn.Linear):
        raise TypeError(f"last module is {type(head).__name__}, not Linear")
    return model[:-1], head


def _shape_inputs(workload: str, X: torch.Tensor) -> torch.Tensor:
    if workload == "W3":
        return colour_images(X, SEED)
    return X.reshape(-1, 1, 8, 8) if workload == "W2" else X


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1], split by a seeded permutation into 1,400 train rows and the rest."""
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SEED))
    train, test = perm[:N_TRAIN], perm[N_TRAIN:]
    return X[train], y[train], X[test], y[test]


def _accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(X).argmax(-1) == y).float().mean().item()


def train(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> None:
    """A few seeded epochs of Adam on mean cross-entropy."""
    torch.manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(TRAIN_EPOCHS):
        for idx in torch.randperm(len(y), generator=gen).split(TRAIN_BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def make_fit_data(X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat the train split ``FIT_REPEATS`` times and add small seeded Gaussian noise."""
    gen = torch.Generator().manual_seed(SEED + 1)
    X_rep = X.repeat(FIT_REPEATS, *([1] * (X.dim() - 1)))
    noise = torch.randn(X_rep.shape, generator=gen) * FIT_NOISE_STD
    return X_rep + noise, y.repeat(FIT_REPEATS)


def prepare_bundle(workload: str) -> Bundle:
    """Train the workload's model and build its fit data."""
    torch.manual_seed(SEED)
    X_tr, y_tr, X_te, y_te = load_digits_split()
    X_tr, X_te = _shape_inputs(workload, X_tr), _shape_inputs(workload, X_te)
    if workload == "W3":
        X_tr, y_tr = X_tr[:W3_ROWS], y_tr[:W3_ROWS]
    model = build_model(workload)
    train(model, X_tr, y_tr)
    X_fit, y_fit = (X_tr, y_tr) if workload == "W3" else make_fit_data(X_tr, y_tr)
    return Bundle(
        workload=workload,
        X=X_fit,
        y=y_fit,
        state_dict={k: v.clone() for k, v in model.state_dict().items()},
        train_accuracy=_accuracy(model, X_tr, y_tr),
        test_accuracy=_accuracy(model, X_te, y_te),
    )


def save_bundle(bundle: Bundle, path: Path) -> None:
    torch.save(bundle.__dict__, path)


def load_bundle(path: Path) -> Bundle:
    return Bundle(**torch.load(path, weights_only=False))


def restore(bundle: Bundle) -> tuple[nn.Sequential, DataLoader]:
    """The trained model (eval mode) and the fit loader of ``bundle``."""
    model = build_model(bundle.workload)
    model.load_state_dict(bundle.state_dict)
    model.eval()
    loader = DataLoader(
        TensorDataset(bundle.X, bundle.y), batch_size=batch_size(bundle.workload), shuffle=False
    )
    return model, loader
