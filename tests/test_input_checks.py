"""Small frictions a new user meets, each a clear answer instead of a silent surprise:
a one-element prior tensor, frozen parameters named in ``subset``, NaN inputs at
``predict``, and a grid search that ends on its grid's edge."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_close, generator
from torch import nn

from laplacefim import Laplace

DTYPE = torch.float64


def _problem():
    g = generator(9200)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    x = torch.randn(40, 3, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, x, y, [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]


def test_a_one_element_prior_is_a_scalar():
    model, _, _, loader = _problem()
    scalar = Laplace(model, structure="full", prior_precision=2.0).fit(loader)
    one = Laplace(model, structure="full", prior_precision=torch.tensor([2.0])).fit(loader)
    assert one.prior_precision.shape == ()
    expected = scalar.log_marginal_likelihood().detach()
    assert_close(one.log_marginal_likelihood().detach(), expected, 0.0)
    value = scalar.log_marginal_likelihood(torch.tensor([2.0], dtype=DTYPE)).detach()
    assert_close(value, expected, 0.0)


def test_frozen_parameters_named_in_subset_are_refused_by_name():
    model, _, _, loader = _problem()
    model[0].bias.requires_grad_(False)
    la = Laplace(model, subset=["0.weight", "0.bias", "2.weight"])
    with pytest.raises(ValueError, match=r"frozen parameters.*\['0\.bias'\]"):
        la.fit(loader)


def test_non_finite_inputs_at_predict_are_refused_naming_the_rows():
    model, x, _, loader = _problem()
    la = Laplace(model, structure="kron").fit(loader)
    bad = x[:6].clone()
    bad[1, 0] = float("nan")
    bad[4, 2] = float("inf")
    for call in (la.predict, lambda v: la.predictive_samples(v, 3)):
        with pytest.raises(ValueError, match=r"2 row\(s\): 1, 4"):
            call(bad)
    assert la.predict(x[:6]).probs.isfinite().all()


def test_gridsearch_warns_when_it_ends_on_an_edge():
    model, x, y, loader = _problem()
    val = [(x, y)]
    la = Laplace(model, structure="kron").fit(loader)
    # tiny priors give a flat, broad predictive: the largest of them fits best
    with pytest.warns(RuntimeWarning, match="largest prior precision"):
        result = la.tune_prior(
            "gridsearch", val_loader=val, grid=torch.tensor([1e-6, 1e-5], dtype=DTYPE)
        )
    assert float(result.prior_precision) == 1e-5
    # an interior optimum gives no warning: the same search on a grid that brackets it
    scores = {}
    for value in torch.logspace(-3, 5, 9, dtype=DTYPE):
        la.prior_precision = float(value)
        scores[float(value)] = float(la.predict(x).probs.log().gather(1, y[:, None]).sum())
    best = max(scores, key=scores.get)
    grid = torch.tensor([best / 10, best, best * 10], dtype=DTYPE)
    if best in (min(scores), max(scores)):
        pytest.skip("the optimum of this problem is at the edge of the bracket")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = la.tune_prior("gridsearch", val_loader=val, grid=grid)
    assert float(result.prior_precision) == pytest.approx(best)


class _Masked(nn.Module):
    """Takes a mapping with an additive float mask (0 or -inf), as attention models do."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3, dtype=DTYPE)

    def forward(self, inputs):
        keep = torch.isfinite(inputs["mask"]).to(DTYPE)  # -inf masks a feature out
        return self.linear(inputs["x"] * keep)


def test_mapping_inputs_may_hold_inf_masks_but_not_nan():
    _, x, y, _ = _problem()
    mask = torch.zeros_like(x)
    mask[:, 2] = float("-inf")
    batches = [{"x": x[i : i + 10], "mask": mask[i : i + 10], "y": y[i : i + 10]} for i in (0, 10)]
    la = Laplace(_Masked(), structure="kron", y_key="y").fit(batches)
    probs = la.predict({"x": x[:4], "mask": mask[:4]}).probs
    assert probs.isfinite().all()
    bad = x[:4].clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN values in 1 row\(s\): 3"):
        la.predict({"x": bad, "mask": mask[:4]})
