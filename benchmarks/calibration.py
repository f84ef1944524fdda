"""Calibration benchmark: post-hoc Laplace and evidence-driven training against MAP,
temperature scaling and deep ensembles, on the same models, over several seeds.

Tasks (all data generated or bundled; nothing is downloaded):

* ``digits``: scikit-learn's 8x8 digits, MLP 64-128-128-10; test digits rotated by
  0-60 degrees; out-of-distribution sets: uniform noise, pixel-shuffled digits, and 8x8
  patches of scikit-learn's two bundled photographs (``load_sample_images``).
* ``mnist1d``: MNIST-1D made by the ``mnist1d`` package's generator (``make_dataset``,
  never its download), MLP 40-128-128-10; its shift: the same generator with twice the
  correlated noise, five times the i.i.d. noise and 1.5x the shear.
* ``breast_cancer``: binary, MLP 30-32-1.
* ``diabetes``: regression, MLP 10-32-1 (Gaussian NLL, CRPS, 90 % coverage).

Methods: MAP (Adam, weight decay 1e-4); temperature scaling (T on the validation split);
a 5-member deep ensemble; ours post-hoc with layer-wise evidence-tuned priors
(last-layer KFAC with the probit and the MC link, all-weights KFAC with the probit and the
MC link and with a scalar prior, all-weights KFAC with a scalar prior chosen instead by
the validation split's NLL (``KFAC-val``, the split TS uses), EKFAC, diagonal with a
layer-wise and with a per-parameter prior); ours trained by ``train_marglik`` (all-weights
KFAC, layer-wise prior; the same epochs, an evidence step every 5 epochs); and, where
laplace-torch is installed (``.venv-bench``), its last-layer KFAC and its
``marglik_training`` on the same model and schedule. The models have no dropout, so MC
dropout is not run. Cost: wall time of everything a method needs (training included) over
MAP training's.

Run:
    .venv-bench/bin/python benchmarks/calibration.py --json calibration.json --plot shift.png
    .venv-bench/bin/python benchmarks/calibration.py --quick          # one seed, fewer epochs
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from laplacefim import Laplace, train_marglik
from laplacefim.demo import noise_images, rotate, shuffle_pixels
from laplacefim.evaluation import classification_scores, ood_scores, regression_scores

ANGLES = (0.0, 15.0, 30.0, 45.0, 60.0)
N_MEMBERS = 5
WEIGHT_DECAY = 1e-4
MARGLIK_FREQUENCY = 5


# ------------------------------------------------------------------------------ data
@dataclass
class Task:
    name: str
    likelihood: str  # "classification", "binary", "regression"
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    widths: tuple[int, ...]
    epochs: int
    batch_size: int
    lr: float
    shifted: dict[str, Tensor]  # name -> inputs, labels are y_test (or shift_labels)
    shift_labels: dict[str, Tensor]
    ood: dict[str, Tensor]


def _split(x: np.ndarray, y: np.ndarray, seed: int, n_val: float, n_test: float, stratify: bool):
    from sklearn.model_selection import train_test_split

    strat = y if stratify else None
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=n_test, random_state=seed, stratify=strat
    )
    strat = y_rest if stratify else None
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=n_val, random_state=seed, stratify=strat
    )
    return x_train, y_train, x_val, y_val, x_test, y_test


def _pairs(xs: list[Tensor], ys: list[Tensor]) -> tuple[Tensor, ...]:
    """``(x_train, y_train, x_val, y_val, x_test, y_test)`` from the three splits."""
    return (xs[0], ys[0], xs[1], ys[1], xs[2], ys[2])


def _photo_patches(n: int, generator: torch.Generator) -> Tensor:
    """8x8 grey patches (average-pooled 32x32 crops) of the two bundled photographs."""
    from sklearn.datasets import load_sample_images

    images = [
        torch.tensor(im, dtype=torch.float32).mean(-1) / 255.0 for im in load_sample_images().images
    ]
    out = []
    for i in range(n):
        im = images[i % len(images)]
        r = int(torch.randint(0, im.shape[0] - 32, (), generator=generator))
        c = int(torch.randint(0, im.shape[1] - 32, (), generator=generator))
        out.append(F.avg_pool2d(im[r : r + 32, c : c + 32][None, None], 4).reshape(64))
    return torch.stack(out)


def digits_task(seed: int, epochs: int) -> Task:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    parts = _split(x / 16.0, y, seed, n_val=200, n_test=400, stratify=True)
    xs = [torch.tensor(p, dtype=torch.float32) for p in parts[0::2]]
    ys = [torch.tensor(p, dtype=torch.int64) for p in parts[1::2]]
    g = torch.Generator().manual_seed(1000 + seed)
    x_test = xs[2]
    shifted = {f"rot{a:g}": rotate(x_test, a) for a in ANGLES if a > 0}
    ood = {
        "noise": noise_images(len(x_test), 64, g),
        "shuffled": shuffle_pixels(x_test, g),
        "photos": _photo_patches(len(x_test), g),
    }
    return Task(
        "digits",
        "classification",
        *_pairs(xs, ys),
        widths=(64, 128, 128, 10),
        epochs=epochs,
        batch_size=64,
        lr=1e-3,
        shifted=shifted,
        shift_labels={},
        ood=ood,
    )


def mnist1d_task(seed: int, epochs: int) -> Task:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = 42 + seed
    data = make_dataset(args)
    x = np.concatenate([data["x"], data["x_test"]])
    y = np.concatenate([data["y"], data["y_test"]])
    parts = _split(x, y, seed, n_val=500, n_test=1000, stratify=True)
    xs = [torch.tensor(p, dtype=torch.float32) for p in parts[0::2]]
    ys = [torch.tensor(p, dtype=torch.int64) for p in parts[1::2]]
    shift = get_dataset_args()
    shift.seed, shift.num_samples, shift.train_split = 7 + seed, 1000, 0.0
    shift.corr_noise_scale *= 2.0
    shift.iid_noise_scale *= 5.0
    shift.shear_scale *= 1.5
    shifted_data = make_dataset(shift)
    shifted = {"shift": torch.tensor(shifted_data["x_test"], dtype=torch.float32)}
    labels = {"shift": torch.tensor(shifted_data["y_test"], dtype=torch.int64)}
    return Task(
        "mnist1d",
        "classification",
        *_pairs(xs, ys),
        widths=(40, 128, 128, 10),
        epochs=epochs,
        batch_size=100,
        lr=1e-3,
        shifted=shifted,
        shift_labels=labels,
        ood={},
    )


def tabular_task(name: str, seed: int, epochs: int) -> Task:
    from sklearn.datasets import load_breast_cancer, load_diabetes

    binary = name == "breast_cancer"
    x, y = (load_breast_cancer if binary else load_diabetes)(return_X_y=True)
    parts = _split(x, y, seed, n_val=0.2, n_test=0.2, stratify=binary)
    mu, sd = parts[0].mean(0), parts[0].std(0) + 1e-8
    xs = [torch.tensor((p - mu) / sd, dtype=torch.float32) for p in parts[0::2]]
    if binary:
        ys = [torch.tensor(p, dtype=torch.float32) for p in parts[1::2]]
    else:
        ym, ysd = parts[1].mean(), parts[1].std()
        ys = [torch.tensor((p - ym) / ysd, dtype=torch.float32)[:, None] for p in parts[1::2]]
    d = x.shape[1]
    return Task(
        name,
        "binary" if binary else "regression",
        *_pairs(xs, ys),
        widths=(d, 32, 1),
        epochs=epochs,
        batch_size=32,
        lr=1e-3,
        shifted={},
        shift_labels={},
        ood={},
    )


# ------------------------------------------------------------------------------ models
def make_model(widths: tuple[int, ...], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def loader(task: Task, seed: int, shuffle: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(task.x_train, task.y_train),
        batch_size=task.batch_size,
        shuffle=shuffle,
        generator=g,
    )


def loss_fn(task: Task, out: Tensor, y: Tensor) -> Tensor:
    if task.likelihood == "classification":
        return F.cross_entropy(out, y)
    if task.likelihood == "binary":
        return F.binary_cross_entropy_with_logits(out.reshape(-1), y)
    return F.mse_loss(out, y)


def train_map(task: Task, seed: int) -> nn.Module:
    model = make_model(task.widths, seed)
    opt = torch.optim.Adam(model.parameters(), lr=task.lr, weight_decay=WEIGHT_DECAY)
    data = loader(task, seed)
    model.train()
    for _ in range(task.epochs):
        for x, y in data:
            opt.zero_grad()
            loss_fn(task, model(x), y).backward()
            opt.step()
    model.eval()
    return model


# ------------------------------------------------------------------------------ predictions
# A predictor maps inputs to probabilities (B, C) / P(y=1) (B,), or to (mean, var).
Predictor = Callable[[Tensor], Any]


def map_predictor(
    task: Task, model: nn.Module, temperature: float = 1.0, sigma: float | None = None
) -> Predictor:
    def predict(x: Tensor):
        with torch.no_grad():
            out = model(x)
        if task.likelihood == "classification":
            return (out / temperature).softmax(-1)
        if task.likelihood == "binary":
            return (out.reshape(-1) / temperature).sigmoid()
        return out, torch.full_like(out, sigma**2)

    return predict


def residual_sigma(task: Task, model: nn.Module) -> float:
    with torch.no_grad():
        return float((model(task.x_train) - task.y_train).square().mean().sqrt())


def fit_temperature(task: Task, model: nn.Module) -> float:
    """The temperature with the lowest validation NLL on a grid of 401 values in e^±4."""
    with torch.no_grad():
        out = model(task.x_val)
        grid = torch.linspace(-4.0, 4.0, 401).exp()
        losses = [float(loss_fn(task, out / t, task.y_val)) for t in grid]
    return float(grid[min(range(len(grid)), key=losses.__getitem__)])


def ensemble_predictor(task: Task, models: list[nn.Module]) -> Predictor:
    regression = task.likelihood == "regression"
    members = [
        map_predictor(task, m, sigma=residual_sigma(task, m) if regression else None)
        for m in models
    ]

    def predict(x: Tensor):
        outs = [m(x) for m in members]
        if task.likelihood != "regression":
            return torch.stack(outs).mean(0)
        means = torch.stack([o[0] for o in outs])
        second = torch.stack([o[1] + o[0].square() for o in outs]).mean(0)
        mean = means.mean(0)
        return mean, second - mean.square()

    return predict


def laplace_predictor(task: Task, la: Laplace, link: str = "probit") -> Predictor:
    def predict(x: Tensor):
        if task.likelihood == "regression":
            pred = la.predict(x)
            return pred.mean.detach(), pred.var.detach()
        options = {"link": link}
        if link == "mc":
            options.update(n_samples=200, generator=torch.Generator().manual_seed(0))
        return la.predict(x, **options).probs.detach()

    return predict


def posthoc(task: Task, model: nn.Module, subset: str, structure: str, prior: str) -> Laplace:
    """A fitted posterior with its prior tuned by the evidence (``prior`` its structure) or,
    for ``prior="val"``, a scalar prior by the validation split's NLL (the split TS uses)."""
    la = Laplace(model, task.likelihood, subset=subset, structure=structure)
    la.fit(loader(task, 0, shuffle=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if prior == "val":
            val = DataLoader(TensorDataset(task.x_val, task.y_val), batch_size=256)
            la.tune_prior("gridsearch", val_loader=val)
        else:
            la.tune_prior(prior_structure=prior)
    return la


# ------------------------------------------------------------------------------ peers
def peer_available() -> bool:
    try:
        import laplace  # noqa: F401
    except ImportError:
        return False
    return True


def peer_predictor(la: Any) -> Predictor:
    def predict(x: Tensor):
        with torch.no_grad():
            return la(x, pred_type="glm", link_approx="probit").detach()

    return predict


def peer_last_layer(task: Task, model: nn.Module) -> Any:
    from laplace import Laplace as PeerLaplace

    la = PeerLaplace(
        model, "classification", subset_of_weights="last_layer", hessian_structure="kron"
    )
    la.fit(loader(task, 0, shuffle=False))
    la.optimize_prior_precision(method="marglik")
    return la


def peer_marglik(task: Task, seed: int) -> tuple[Any, nn.Module]:
    from laplace.marglik_training import marglik_training

    model = make_model(task.widths, seed)
    la, model, _, _ = marglik_training(
        model,
        loader(task, seed),
        likelihood="classification",
        hessian_structure="kron",
        optimizer_kwargs={"lr": task.lr},
        n_epochs=task.epochs,
        marglik_frequency=MARGLIK_FREQUENCY,
        prior_structure="layerwise",
    )
    model.eval()
    return la, model


# ------------------------------------------------------------------------------ scoring
def score(task: Task, predict: Predictor) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    if task.likelihood == "regression":
        mean, var = predict(task.x_test)
        out["clean"] = regression_scores(mean, var, task.y_test)
        return out
    clean = predict(task.x_test)
    out["clean"] = classification_scores(clean, task.y_test)
    for name, x in task.shifted.items():
        labels = task.shift_labels.get(name, task.y_test)
        out[name] = classification_scores(predict(x), labels)
    if task.ood:
        aurocs = {name: ood_scores(clean, predict(x))["auroc"] for name, x in task.ood.items()}
        out["ood"] = {**aurocs, "mean_auroc": statistics.fmean(aurocs.values())}
    return out


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def run_task(task: Task, seed: int, peers: bool, log: Callable[[str], None]) -> dict[str, Any]:
    results: dict[str, Any] = {}

    def add(name: str, predict: Predictor, seconds: float, **extra: Any) -> None:
        results[name] = {"scores": score(task, predict), "seconds": seconds, **extra}
        log(f"  {task.name} seed {seed}: {name} ({seconds:.1f} s)")

    warm = Task(**{**task.__dict__, "epochs": 1})
    posthoc(warm, train_map(warm, seed), "all", "kron", "layerwise")  # first-call costs
    model, t_map = timed(lambda: train_map(task, seed))
    sigma = residual_sigma(task, model) if task.likelihood == "regression" else None
    add("MAP", map_predictor(task, model, sigma=sigma), t_map)
    if task.likelihood != "regression":
        temperature, t_ts = timed(lambda: fit_temperature(task, model))
        add("TS", map_predictor(task, model, temperature), t_map + t_ts, temperature=temperature)
    members, t_de = timed(
        lambda: [model] + [train_map(task, 100 * seed + k) for k in range(1, N_MEMBERS)]
    )
    add("DE-5", ensemble_predictor(task, members), t_map + t_de)
    variants = [
        ("LL-KFAC", "last_layer", "kron", "layerwise", "probit"),
        ("LL-KFAC-MC", "last_layer", "kron", "layerwise", "mc"),
        ("KFAC", "all", "kron", "layerwise", "probit"),
        ("KFAC-scalar", "all", "kron", "scalar", "probit"),
        ("KFAC-MC", "all", "kron", "layerwise", "mc"),
        ("KFAC-val", "all", "kron", "val", "probit"),
        ("EKFAC", "all", "ekfac", "layerwise", "probit"),
        ("Diag", "all", "diag", "layerwise", "probit"),
        ("Diag-pp", "all", "diag", "diagonal", "probit"),
    ]
    for name, subset, structure, prior, link in variants:
        if link == "mc" and task.likelihood != "classification":
            continue
        la, t_fit = timed(posthoc, task, model, subset, structure, prior)
        add(
            name,
            laplace_predictor(task, la, link),
            t_map + t_fit,
            log_marginal_likelihood=float(la.log_marginal_likelihood()),
        )
    fresh = make_model(task.widths, seed)
    result, t_ml = timed(
        lambda: train_marglik(
            fresh,
            loader(task, seed),
            task.likelihood,
            epochs=task.epochs,
            lr=task.lr,
            structure="kron",
            prior_structure="layerwise",
            marglik_frequency=MARGLIK_FREQUENCY,
        )
    )
    fresh.eval()
    add(
        "ML-KFAC",
        laplace_predictor(task, result.laplace),
        t_ml,
        log_marginal_likelihood=result.log_marginal_likelihood,
    )
    if task.likelihood == "classification":
        add("ML-KFAC-MC", laplace_predictor(task, result.laplace, "mc"), t_ml)
    if peers and task.likelihood == "classification":
        peer, t_peer = timed(lambda: peer_last_layer(task, model))
        add("lt:LL-KFAC", peer_predictor(peer), t_map + t_peer)
        (peer_la, peer_model), t_pml = timed(lambda: peer_marglik(task, seed))
        # The two libraries' KFAC evidences differ in form (laplace-torch folds the bias
        # into the input factor), so its network is also scored by ours, as ML-KFAC's is.
        ours_on_peer = posthoc(task, peer_model, "all", "kron", "layerwise")
        add(
            "lt:ML-KFAC",
            peer_predictor(peer_la),
            t_pml,
            log_marginal_likelihood=float(peer_la.log_marginal_likelihood()),
            our_evidence=float(ours_on_peer.log_marginal_likelihood()),
        )
    for entry in results.values():
        entry["cost"] = entry["seconds"] / t_map
    return results


# ------------------------------------------------------------------------------ report
def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every number."""
    out: dict[str, Any] = {}
    for method in runs[0]:
        scores: dict[str, dict[str, tuple[float, float]]] = {}
        for split in runs[0][method]["scores"]:
            scores[split] = {}
            for metric in runs[0][method]["scores"][split]:
                values = [r[method]["scores"][split][metric] for r in runs]
                scores[split][metric] = (
                    statistics.fmean(values),
                    statistics.stdev(values) if len(values) > 1 else 0.0,
                )
        costs = [r[method]["cost"] for r in runs]
        evidence = [r[method].get("log_marginal_likelihood") for r in runs]
        rescored = [r[method].get("our_evidence") for r in runs]
        out[method] = {
            "scores": scores,
            "cost": (statistics.fmean(costs), statistics.stdev(costs) if len(costs) > 1 else 0.0),
            "seconds": statistics.fmean(r[method]["seconds"] for r in runs),
            "log_marginal_likelihood": (
                statistics.fmean(evidence) if all(e is not None for e in evidence) else None
            ),
            "our_evidence": (
                statistics.fmean(rescored) if all(e is not None for e in rescored) else None
            ),
        }
    return out


def fmt(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.3f}±{pair[1]:.3f}"


def print_task(name: str, likelihood: str, summary: dict[str, Any]) -> None:
    print(f"\n== {name} ({likelihood}); mean ± std over seeds; cost = time / MAP training")
    if likelihood == "regression":
        metrics = ("gaussian_nll", "crps", "coverage_90", "rmse")
    else:
        metrics = ("accuracy", "nll", "ece", "brier")
    splits = list(next(iter(summary.values()))["scores"])
    for split in splits:
        if split == "ood":
            continue
        print(f"-- {split}")
        print(
            f"{'method':12s}"
            + "".join(f"{m:>16s}" for m in metrics)
            + (f"{'OOD AUROC':>16s}" if split == "clean" and "ood" in splits else "")
            + (f"{'cost':>12s}" if split == "clean" else "")
        )
        for method, entry in summary.items():
            row = f"{method:12s}" + "".join(
                f"{fmt(entry['scores'][split][m]):>16s}" for m in metrics
            )
            if split == "clean" and "ood" in splits:
                row += f"{fmt(entry['scores']['ood']['mean_auroc']):>16s}"
            if split == "clean":
                row += f"{entry['cost'][0]:>12.2f}"
            print(row)
    evid = {
        m: e["log_marginal_likelihood"]
        for m, e in summary.items()
        if e["log_marginal_likelihood"] is not None
    }
    if evid:
        print(
            "log evidence (mean over seeds): " + ", ".join(f"{m} {v:.1f}" for m, v in evid.items())
        )


def plot_shift(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    splits = ["clean"] + [f"rot{a:g}" for a in ANGLES if a > 0]
    colours = plt.get_cmap("tab20").colors
    for i, (method, entry) in enumerate(summary.items()):
        style = {"color": colours[i % 20], "linestyle": "-" if i < 10 else "--", "marker": "o"}
        for ax, metric in zip(axes, ("nll", "ece"), strict=True):
            means = [entry["scores"][s][metric][0] for s in splits]
            ax.plot(ANGLES, means, label=method, **style)
            ax.set_xlabel("rotation (degrees)")
            ax.set_ylabel(metric.upper())
            ax.set_title(f"digits: {metric.upper()} under rotation (mean of seeds)")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def check_targets(tasks: dict[str, Any]) -> None:
    """Issue 12's targets, per method: each ``ok`` or ``--`` (not met), with the numbers."""
    base = ("MAP", "TS", "DE-5")
    shifts = {"digits": ["rot30", "rot45", "rot60"], "mnist1d": ["shift"]}
    methods = [m for m in tasks.get("digits", tasks[next(iter(tasks))])["summary"] if m not in base]
    print("\n== targets (mean over seeds; shift: every split listed must pass)")
    header = (
        "in-dist NLL&ECE<=MAP",
        "shift <MAP,<TS",
        "shift <=DE+sd",
        "OOD>=DE-.01",
        "cost<=DE/4",
    )
    print(f"{'method':12s}" + "".join(f"{h:>22s}" for h in header))
    for method in methods:
        cells = []
        ok_in, ok_shift, ok_de, ok_cost = True, True, True, True
        for name in ("digits", "mnist1d"):
            if name not in tasks or method not in tasks[name]["summary"]:
                continue
            summary = tasks[name]["summary"]
            ours = summary[method]["scores"]
            for metric in ("nll", "ece"):
                ok_in &= ours["clean"][metric][0] <= summary["MAP"]["scores"]["clean"][metric][0]
                for split in shifts[name]:
                    mine = ours[split][metric][0]
                    ok_shift &= mine < summary["MAP"]["scores"][split][metric][0]
                    ok_shift &= mine < summary["TS"]["scores"][split][metric][0]
                    de = summary["DE-5"]["scores"][split][metric]
                    ok_de &= mine <= de[0] + de[1]
            ok_cost &= summary[method]["cost"][0] <= summary["DE-5"]["cost"][0] / 4
        ood = tasks.get("digits", {}).get("summary", {})
        if method in ood:
            mine = ood[method]["scores"]["ood"]["mean_auroc"][0]
            de = ood["DE-5"]["scores"]["ood"]["mean_auroc"][0]
            ok_ood = f"{'ok' if mine >= de - 0.01 else '--'} {mine:.3f}/{de:.3f}"
        else:
            ok_ood = "n/a"
        for flag in (ok_in, ok_shift, ok_de):
            cells.append("ok" if flag else "--")
        cells.append(ok_ood)
        cells.append("ok" if ok_cost else "--")
        print(f"{method:12s}" + "".join(f"{c:>22s}" for c in cells))
    for name, entry in tasks.items():
        summary = entry["summary"]
        if "ML-KFAC" not in summary:
            continue
        ours = summary["ML-KFAC"]
        line = f"{name}: train_marglik cost {ours['cost'][0]:.2f}x MAP training (target <= 2)"
        if "lt:ML-KFAC" in summary:
            peer = summary["lt:ML-KFAC"]
            line += (
                f"; laplace-torch marglik_training / ours time {peer['seconds'] / ours['seconds']:.2f}"
                f" (target >= 3); log evidence ours {ours['log_marginal_likelihood']:.1f}"
                f" vs {peer['log_marginal_likelihood']:.1f} (laplace-torch's own KFAC form)"
            )
            if peer.get("our_evidence") is not None:
                line += f", {peer['our_evidence']:.1f} (our KFAC form, same as ours)"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default="digits,mnist1d,breast_cancer,diabetes")
    parser.add_argument("--quick", action="store_true", help="one seed, a third of the epochs")
    parser.add_argument("--no-peers", action="store_true", help="skip laplace-torch")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--from-json", default=None, help="print the tables of a saved run")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        for name, entry in saved["tasks"].items():
            print_task(name, entry["likelihood"], entry["summary"])
        check_targets(saved["tasks"])
        if args.plot and "digits" in saved["tasks"]:
            plot_shift(saved["tasks"]["digits"]["summary"], args.plot)
        return
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    scale = 3 if args.quick else 1
    peers = not args.no_peers and peer_available()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    makers = {
        "digits": lambda s: digits_task(s, 30 // scale),
        "mnist1d": lambda s: mnist1d_task(s, 60 // scale),
        "breast_cancer": lambda s: tabular_task("breast_cancer", s, 100 // scale),
        "diabetes": lambda s: tabular_task("diabetes", s, 200 // scale),
    }
    started = time.time()
    load = os.getloadavg()[0]
    report: dict[str, Any] = {
        "seeds": seeds,
        "peers": peers,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_start": load,
        "tasks": {},
    }
    for name in args.tasks.split(","):
        runs = []
        task = None
        for seed in seeds:
            task = makers[name](seed)
            runs.append(run_task(task, seed, peers, log))
        assert task is not None
        summary = aggregate(runs)
        report["tasks"][name] = {"likelihood": task.likelihood, "summary": summary, "runs": runs}
        print_task(name, task.likelihood, summary)
        if name == "digits" and args.plot:
            plot_shift(summary, args.plot)
    check_targets(report["tasks"])
    report["load_end"] = os.getloadavg()[0]
    report["wall_s"] = time.time() - started
    print(
        f"\nload average {load:.2f} -> {report['load_end']:.2f}; wall {report['wall_s']:.0f} s;"
        f" laplace-torch {'on' if peers else 'off'}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                report, f, indent=1, default=lambda v: list(v) if isinstance(v, tuple) else str(v)
            )


if __name__ == "__main__":
    main()
