"""Quickstart: train a small MLP on scikit-learn's digits and fit a last-layer KFAC Laplace.

Run with ``python examples/quickstart.py`` (about 10 s). Everything is seeded with
local generators; the global random state is left alone.
"""

from __future__ import annotations

import time

import torch
from _smoke import size
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplacefim import Laplace


def digits_loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Digits scaled to [0, 1], split 1,400 train / 397 test, batch 128."""
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X / 16.0, y, train_size=1400, random_state=seed, stratify=y
    )

    def loader(X: object, y: object, shuffle: bool) -> DataLoader:
        data = TensorDataset(torch.tensor(X, dtype=torch.float32), torch.tensor(y))
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(data, batch_size=128, shuffle=shuffle, generator=generator)

    return loader(X_train, y_train, True), loader(X_test, y_test, False)


def make_mlp(seed: int = 0) -> nn.Module:
    """An MLP 64-256-256-10 (64-32-32-10 in smoke mode), initialised from a local seed."""
    width = size(256, 32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(64, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 10),
        )


def train(model: nn.Module, loader: DataLoader, epochs: int | None = None) -> None:
    """Plain Adam on the summed cross-entropy (weight decay acts as a Gaussian prior)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(size(30, 1) if epochs is None else epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of the MAP model."""
    model.eval()
    hits = sum(int((model(x).argmax(-1) == y).sum()) for x, y in loader)
    return hits / sum(len(y) for _, y in loader)


def main() -> None:
    torch.set_num_threads(2)
    train_loader, test_loader = digits_loaders()
    model = make_mlp()
    start = time.perf_counter()
    train(model, train_loader)
    print(
        f"trained MLP 64-256-256-10 on 1,400 digits in {time.perf_counter() - start:.1f} s; "
        f"test accuracy {accuracy(model, test_loader):.3f}"
    )

    la = Laplace(
        model, "classification", subset="last_layer", structure="kron", prior_precision=1.0
    )
    start = time.perf_counter()
    la.fit(train_loader, progress=True)
    seconds = time.perf_counter() - start
    print(f"fitted {la!r} in {seconds * 1000:.1f} ms")
    print(f"  last layer: {la.last_layer!r}; parameters: {list(la.parameter_names)}")
    for name, block in zip(la.parameter_names, la.curvature.blocks, strict=True):
        shapes = [tuple(t.shape) for t in block.state()]
        print(f"  {name}: {type(block).__name__} with state shapes {shapes}")
    precision = la.posterior_precision
    diagonal = precision.diagonal()
    print(
        f"  posterior precision: P = {precision.n_params}, diagonal in "
        f"[{diagonal.min():.3g}, {diagonal.max():.3g}], mean {diagonal.mean():.3g}"
    )
    print(f"  log-likelihood at the MAP (sum over {la.n_data} data): {la.log_likelihood:.2f}")


if __name__ == "__main__":
    main()
