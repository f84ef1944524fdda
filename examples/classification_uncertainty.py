"""Classification with calibrated uncertainty: fit, tune the prior, predict, compare with MAP.

Trains the digits MLP of the quickstart, fits last-layer and all-weights KFAC Laplace
posteriors, tunes each prior by marginal likelihood, and compares test NLL, accuracy and
confidence with the MAP network on clean and noise-corrupted digits. Also shows function
samples, weight samples and saving / loading.

Run: ``python examples/classification_uncertainty.py``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from _smoke import size
from quickstart import accuracy, digits_loaders, make_mlp, train

from laplacefim import Laplace


def nll_and_confidence(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean test NLL and mean top-class probability."""
    nll = -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean()
    return float(nll), float(probs.max(-1).values.mean())


def main() -> None:
    torch.set_num_threads(2)
    train_loader, test_loader = digits_loaders()
    model = make_mlp()
    train(model, train_loader)
    x_test = torch.cat([x for x, _ in test_loader])
    y_test = torch.cat([y for _, y in test_loader])
    noise = torch.Generator().manual_seed(1)
    x_noisy = (x_test + 0.5 * torch.randn(x_test.shape, generator=noise)).clamp(0, 1)
    print(f"MAP test accuracy {accuracy(model, test_loader):.3f}")

    with torch.no_grad():
        model.eval()
        rows = {"MAP": (model(x_test).softmax(-1), model(x_noisy).softmax(-1))}
    for subset in ("last_layer", "all"):
        la = Laplace(model, "classification", subset=subset, structure="kron")
        start = time.perf_counter()
        la.fit(train_loader)
        tuned = la.tune_prior()
        seconds = time.perf_counter() - start
        print(
            f"{subset:>10}: P = {la.n_params}, fit + tune {seconds:.2f} s, prior precision "
            f"{float(tuned.prior_precision):.3g} after {tuned.n_iter} Newton steps, "
            f"log evidence {float(tuned.log_marginal_likelihood):.1f}"
        )
        rows[f"Laplace {subset}"] = (la(x_test).probs, la(x_noisy).probs)

    print(f"\n{'':>20} {'clean NLL':>10} {'clean conf':>10} {'noisy NLL':>10} {'noisy conf':>10}")
    for name, (clean, noisy) in rows.items():
        clean_nll, clean_conf = nll_and_confidence(clean, y_test)
        noisy_nll, noisy_conf = nll_and_confidence(noisy, y_test)
        print(
            f"{name:>20} {clean_nll:10.3f} {clean_conf:10.3f} {noisy_nll:10.3f} {noisy_conf:10.3f}"
        )

    # Function samples share one weight draw across inputs: correlated where they should be.
    draws = torch.Generator().manual_seed(2)
    samples = la.predictive_samples(x_test[:4], size(1000, 20), generator=draws)
    print(
        f"\nfunction samples {tuple(samples.shape)}; logit std of input 0: "
        f"{samples[:, 0].std(0).numpy().round(2)}"
    )
    weights = la.sample(5, generator=torch.Generator().manual_seed(3))
    print(f"weight samples {tuple(weights.shape)}; posterior is {type(la.posterior).__name__}")

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "laplace.pt"
        la.save(path)
        restored = Laplace.load(path, model)
        same = torch.equal(restored(x_test).probs, la(x_test).probs)
        print(
            f"saved to {path.name} ({path.stat().st_size / 1e6:.2f} MB); "
            f"reloaded predictions identical: {same}"
        )


if __name__ == "__main__":
    main()
