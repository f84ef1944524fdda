"""Calibration, uncertainty and OOD metrics against independent oracles.

Oracles: scikit-learn (``log_loss``, ``brier_score_loss``, ``accuracy_score``,
``calibration_curve``, ``roc_auc_score``, ``average_precision_score``, ``roc_curve``),
scipy (Gaussian log-density, numerical integration of the CRPS definition), hand-worked
cases, and exact Gaussian samples for coverage. Streaming accumulators are checked to
equal the one-shot functions chunk by chunk and across ``merge``; hypothesis checks
permutation invariance and ranges. Small float64 problems, local generators only.
"""

from __future__ import annotations

import doctest
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import integrate, stats
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from laplacefim import metrics as M
from laplacefim.metrics import classification, regression, uncertainty

# Float64 reassociation between our sums and the oracle's.
TOL = 1e-10
# Monte-Carlo checks allow MC_Z binomial standard errors (fixed local generators, so the
# tests are deterministic).
MC_Z = 5.0
# Relative accuracy asked of scipy.integrate.quad for the CRPS integral.
QUAD_TOL = 1e-7
HYPOTHESIS = settings(max_examples=25, deadline=None)


def random_problem(
    n: int, c: int, seed: int, *, floor: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities ``(n, c)`` (softmax of scaled normals) and labels ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    probs = logits.softmax(-1)
    if floor:
        probs = (probs + floor) / (1 + c * floor)
    # labels drawn from the probabilities themselves: a roughly calibrated model
    labels = torch.multinomial(probs, 1, generator=g)[:, 0]
    return probs, labels


# --------------------------------------------------------------------------- oracles


def test_accuracy_nll_brier_match_sklearn() -> None:
    probs, labels = random_problem(300, 4, 0, floor=1e-3)
    p, y = probs.numpy(), labels.numpy()
    assert M.accuracy(probs, labels) == pytest.approx(skm.accuracy_score(y, p.argmax(1)))
    assert M.nll(probs, labels) == pytest.approx(skm.log_loss(y, p, labels=range(4)), rel=TOL)
    # multi-class Brier: sum over classes, sklearn with scale_by_half=False
    oracle = skm.brier_score_loss(y, p, labels=range(4), scale_by_half=False)
    assert M.brier(probs, labels) == pytest.approx(oracle, rel=TOL)


def test_binary_forms_match_sklearn() -> None:
    probs, labels = random_problem(200, 2, 1, floor=1e-3)
    p1, y = probs[:, 1], labels
    assert M.brier(p1, y) == pytest.approx(skm.brier_score_loss(y.numpy(), p1.numpy()), rel=TOL)
    # the (B, 2) form sums over both columns: twice the single-probability form
    assert M.brier(probs, y) == pytest.approx(2 * M.brier(p1, y), rel=TOL)
    assert M.nll(p1, y) == pytest.approx(skm.log_loss(y.numpy(), p1.numpy()), rel=TOL)
    assert M.nll(p1, y) == pytest.approx(M.nll(probs, y), rel=TOL)
    assert M.accuracy(p1, y) == M.accuracy(probs, y)
    assert M.ece(p1, y) == pytest.approx(M.ece(probs, y), abs=TOL)


def test_numpy_and_float32_inputs() -> None:
    probs, labels = random_problem(50, 3, 2)
    assert M.ece(probs.numpy(), labels.numpy()) == M.ece(probs, labels)
    assert M.nll(probs.float(), labels) == pytest.approx(M.nll(probs, labels), rel=1e-5)
    assert M.accuracy(probs, labels.double()) == M.accuracy(probs, labels)  # integral floats


@pytest.mark.parametrize("n_bins", [8, 10])
def test_positive_class_reliability_matches_calibration_curve(n_bins: int) -> None:
    # sklearn's calibration_curve bins P(y = 1) against y (not the top-label confidence),
    # with np.searchsorted(edges[1:-1], p): bins (lo, hi] with the first closed, as ours. Its
    # edges are np.linspace (k · (1/n)); ours are k / n. Both agree bit for bit when n is a
    # power of two, so with n_bins=8 confidences exactly on edges are compared too; with 10
    # only random confidences (which hit an edge with probability 0). It drops empty bins.
    probs, labels = random_problem(400, 2, 3)
    p1 = probs[:, 1]
    if n_bins == 8:
        p1 = torch.cat([p1, torch.arange(9, dtype=torch.float64) / 8])
        labels = torch.cat([labels, torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 1])])
    diagram = M.reliability(p1, labels, n_bins, class_index=1)
    prob_true, prob_pred = calibration_curve(labels.numpy(), p1.numpy(), n_bins=n_bins)
    full = diagram.count > 0
    np.testing.assert_allclose(diagram.accuracy[full].numpy(), prob_true, rtol=TOL)
    np.testing.assert_allclose(diagram.confidence[full].numpy(), prob_pred, rtol=TOL)
    assert diagram.count.sum() == len(p1)


def test_ood_metrics_match_sklearn() -> None:
    g = torch.Generator().manual_seed(4)
    # integer scores force many ties
    s_in = torch.randint(0, 12, (150,), generator=g).double() + 2
    s_out = torch.randint(0, 12, (90,), generator=g).double()
    y = np.r_[np.ones(150), np.zeros(90)]
    s = np.r_[s_in.numpy(), s_out.numpy()]
    assert M.ood_auroc(s_in, s_out) == pytest.approx(skm.roc_auc_score(y, s), abs=TOL)
    assert M.ood_aupr(s_in, s_out) == pytest.approx(skm.average_precision_score(y, s), abs=TOL)
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    for level in (0.95, 0.5, 1.0):
        expected = fpr[np.searchsorted(tpr, level, side="left")]
        assert M.fpr_at_95_tpr(s_in, s_out, tpr=level) == pytest.approx(expected, abs=TOL)


def test_ood_hand_cases() -> None:
    high, low = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])
    assert M.ood_auroc(high, low) == 1.0 and M.ood_aupr(high, low) == 1.0
    assert M.fpr_at_95_tpr(high, low) == 0.0
    assert M.ood_auroc(low, high) == 0.0  # in-distribution is the positive class
    same = torch.ones(3)
    assert M.ood_auroc(same, same) == 0.5 and M.fpr_at_95_tpr(same, same) == 1.0


# --------------------------------------------------------------------------- hand cases


def test_confidences_on_bin_edges_fall_into_the_lower_bin() -> None:
    probs = torch.tensor([[0.5, 0.5], [0.3, 0.7], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0])
    top = M.reliability(probs, labels, 10)  # confidences 0.5, 0.7, 1.0, 1.0
    expected = torch.zeros(10, dtype=torch.float64)
    expected[[4, 6, 9]] = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    assert torch.equal(top.count, expected)
    assert top.accuracy[9] == 0.5  # the tie 0.5/0.5 predicts class 0: a hit
    positive = M.reliability(probs, labels, 10, class_index=1)  # 0.5, 0.7, 0.0, 1.0
    expected = torch.zeros(10, dtype=torch.float64)
    expected[[0, 4, 6, 9]] = 1.0  # 0 joins the closed first bin [0, 0.1]
    assert torch.equal(positive.count, expected)
    assert torch.equal(top.edges, torch.arange(11, dtype=torch.float64) / 10)


def test_all_samples_in_one_bin() -> None:
    probs = torch.tensor([[0.8, 0.2]] * 5, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1])  # accuracy 0.6 against confidence 0.8
    for norm in ("l1", "l2", "max"):
        assert M.ece(probs, labels, 10, norm=norm) == pytest.approx(0.2, abs=TOL)
    diagram = M.reliability(probs, labels, 10)
    assert int(diagram.count[7]) == 5 and diagram.count.sum() == 5
    assert bool(diagram.accuracy.isnan().sum() == 9)  # empty bins are NaN


def test_empty_bins_and_mce() -> None:
    probs = torch.tensor([[0.95, 0.05]] * 2 + [[0.6, 0.4]] * 2, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])  # gaps 0.05 (two samples) and 0.1 (two samples)
    assert M.ece(probs, labels, 10) == pytest.approx(0.075, abs=TOL)
    assert M.mce(probs, labels, 10) == pytest.approx(0.1, abs=TOL)
    l2 = math.sqrt((2 * 0.05**2 + 2 * 0.1**2) / 4)
    assert M.ece(probs, labels, 10, norm="l2") == pytest.approx(l2, abs=TOL)


def test_classwise_hand_case() -> None:
    probs = torch.tensor([[0.6, 0.3, 0.1]] * 2, dtype=torch.float64)
    labels = torch.tensor([0, 1])  # class gaps |.5 − .6|, |.5 − .3|, |0 − .1|
    assert M.ece(probs, labels, 10, classwise=True) == pytest.approx(0.4 / 3, abs=TOL)
    assert M.ece(probs, labels, 10) == pytest.approx(0.1, abs=TOL)


def test_adaptive_hand_case() -> None:
    p1 = torch.tensor([0.9, 0.1, 0.3, 0.2], dtype=torch.float64)
    labels = torch.tensor([1, 0, 1, 0])
    d = M.reliability(p1, labels, 2, adaptive=True, class_index=1)
    assert torch.equal(d.count, torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert torch.allclose(d.confidence, torch.tensor([0.15, 0.6], dtype=torch.float64))
    assert torch.equal(d.accuracy, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(d.edges, torch.tensor([0.0, 0.2, 1.0], dtype=torch.float64))


def test_entropy_and_max_probability() -> None:
    probs = torch.tensor([[0.25] * 4, [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(M.entropy(probs), torch.tensor([math.log(4), 0.0], dtype=torch.float64))
    assert torch.equal(M.max_probability(probs), torch.tensor([0.25, 1.0], dtype=torch.float64))
    p1 = torch.tensor([0.2, 0.5], dtype=torch.float64)
    assert torch.allclose(M.entropy(p1), M.entropy(torch.stack([1 - p1, p1], 1)))
    assert torch.equal(M.max_probability(p1), torch.tensor([0.8, 0.5], dtype=torch.float64))


def test_mutual_information_brute_force() -> None:
    g = torch.Generator().manual_seed(5)
    samples = torch.randn(7, 5, 3, generator=g, dtype=torch.float64).softmax(-1)
    s = samples.numpy()
    mean = s.mean(0)
    total = -(mean * np.log(mean)).sum(-1)
    aleatoric = -(s * np.log(s)).sum(-1).mean(0)
    out = M.mutual_information(samples)
    np.testing.assert_allclose(out.total.numpy(), total, rtol=TOL)
    np.testing.assert_allclose(out.aleatoric.numpy(), aleatoric, rtol=TOL)
    np.testing.assert_allclose(out.epistemic.numpy(), total - aleatoric, rtol=1e-8, atol=TOL)
    same = M.mutual_information(samples[:1].expand(4, -1, -1))
    assert torch.allclose(same.epistemic, torch.zeros(5, dtype=torch.float64), atol=TOL)
    opposite = M.mutual_information(torch.tensor([[1.0], [0.0]]))  # (S, B) binary
    assert opposite.epistemic.item() == pytest.approx(math.log(2))


# --------------------------------------------------------------------------- regression


def regression_problem(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Means, variances and targets drawn exactly from ``N(mean, var)``."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, generator=g, dtype=torch.float64)
    var = 0.1 + torch.rand(n, generator=g, dtype=torch.float64) ** 2
    y = mean + var.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    return mean, var, y


def test_gaussian_nll_matches_scipy() -> None:
    mean, var, y = regression_problem(100, 6)
    oracle = -stats.norm.logpdf(y.numpy(), mean.numpy(), var.sqrt().numpy()).mean()
    assert M.gaussian_nll(mean, var, y) == pytest.approx(oracle, rel=TOL)
    # (B, K) targets with one noise variance broadcast
    assert M.gaussian_nll(mean[:, None], torch.tensor(0.5), y[:, None]) == pytest.approx(
        -stats.norm.logpdf(y.numpy(), mean.numpy(), math.sqrt(0.5)).mean(), rel=TOL
    )


@pytest.mark.parametrize(("mu", "var", "y"), [(0.0, 1.0, 0.0), (1.0, 0.25, -0.3), (-2, 4.0, 3)])
def test_crps_closed_form_matches_integral_definition(mu: float, var: float, y: float) -> None:
    # CRPS(F, y) = ∫ (F(x) − 1[x ≥ y])² dx, split at y
    dist = stats.norm(mu, math.sqrt(var))
    left = integrate.quad(lambda x: dist.cdf(x) ** 2, -np.inf, y, epsrel=QUAD_TOL)[0]
    right = integrate.quad(lambda x: dist.sf(x) ** 2, y, np.inf, epsrel=QUAD_TOL)[0]
    got = M.crps_gaussian(torch.tensor([mu]), torch.tensor([var]), torch.tensor([y]))
    assert got == pytest.approx(left + right, rel=1e-6)


def test_crps_tends_to_absolute_error() -> None:
    mean, _, y = regression_problem(20, 7)
    got = M.crps_gaussian(mean, torch.full_like(mean, 1e-16), y)
    assert got == pytest.approx(float((y - mean).abs().mean()), rel=1e-6)


@pytest.mark.parametrize("level", [0.5, 0.9])
def test_coverage_of_exact_gaussian_samples(level: float) -> None:
    n = 20_000
    mean, var, y = regression_problem(n, 8)
    result = M.coverage(mean, var, y, level)
    assert abs(result.coverage - level) <= MC_Z * math.sqrt(level * (1 - level) / n)
    z = stats.norm.ppf(0.5 + level / 2)
    assert result.width == pytest.approx(float((2 * z * var.sqrt()).mean()), rel=TOL)
    assert result.level == level


def test_regression_calibration_error() -> None:
    zero = torch.zeros(3, dtype=torch.float64)
    # y equal to the mean: the PIT is ½, so the frequencies are 0, 1, 1 at ¼, ½, ¾
    assert M.calibration_error(zero, zero + 1, zero, levels=[0.25, 0.5, 0.75]) == pytest.approx(
        1 / 3
    )
    n = 20_000
    mean, var, y = regression_problem(n, 9)
    bound = MC_Z * 0.5 / math.sqrt(n)  # each |f_p − p| within MC_Z binomial errors
    assert M.calibration_error(mean, var, y) <= bound
    # overconfident σ/2: the p-quantile is hit with frequency Φ(Φ⁻¹(p) / 2)
    levels = np.array(regression.DEFAULT_LEVELS)
    expected = np.abs(stats.norm.cdf(stats.norm.ppf(levels) / 2) - levels).mean()
    assert M.calibration_error(mean, var / 4, y) == pytest.approx(expected, abs=bound)


def test_sharpness() -> None:
    assert M.sharpness(np.array([1.0, 4.0, 4.0])) == pytest.approx(math.sqrt(3.0))


# --------------------------------------------------------------------------- streaming


def classification_metrics() -> list[Any]:
    return [
        M.Accuracy(),
        M.NLL(),
        M.Brier(),
        M.ECE(10),
        M.ECE(10, norm="max", classwise=True),
        M.ECE(7, norm="l2", adaptive=True, n_sub_bins=512),
        M.Reliability(10),
    ]


def regression_metrics() -> list[Any]:
    return [M.GaussianNLL(), M.CRPS(), M.Coverage(0.8), M.QuantileCalibration()]


def same(a: object, b: object) -> None:
    if isinstance(a, M.ReliabilityDiagram) and isinstance(b, M.ReliabilityDiagram):
        for field in ("edges", "confidence", "accuracy", "count"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), equal_nan=True)
    elif isinstance(a, M.CoverageResult) and isinstance(b, M.CoverageResult):
        assert a.coverage == pytest.approx(b.coverage, abs=TOL)
        assert a.width == pytest.approx(b.width, rel=TOL)
    else:
        assert a == pytest.approx(b, rel=TOL, abs=TOL)


@pytest.mark.parametrize("index", range(7))
def test_classification_streaming_and_merge(index: int) -> None:
    probs, labels = random_problem(120, 3, 10)
    whole = classification_metrics()[index]
    whole.update(probs, labels)
    chunked = classification_metrics()[index]
    for idx in torch.tensor_split(torch.arange(120), [0, 17, 60]):  # includes an empty chunk
        chunked.update(probs[idx], labels[idx])
    same(chunked.compute(), whole.compute())
    first, second = classification_metrics()[index], classification_metrics()[index]
    first.update(probs[:50], labels[:50])
    second.update(probs[50:], labels[50:])
    assert first.merge(second) is first
    same(first.compute(), whole.compute())
    # state() is live: adding states by hand (as an all-reduce would) is the same as merge
    a, b = classification_metrics()[index], classification_metrics()[index]
    a.update(probs[:50], labels[:50])
    b.update(probs[50:], labels[50:])
    for mine, theirs in zip(a.state(), b.state(), strict=True):
        mine.add_(theirs)
    same(a.compute(), whole.compute())


@pytest.mark.parametrize("index", range(4))
def test_regression_streaming_and_merge(index: int) -> None:
    mean, var, y = regression_problem(90, 11)
    whole = regression_metrics()[index]
    whole.update(mean, var, y)
    chunked = regression_metrics()[index]
    for idx in torch.tensor_split(torch.arange(90), [30, 31]):
        chunked.update(mean[idx], var[idx], y[idx])
    same(chunked.compute(), whole.compute())
    first, second = regression_metrics()[index], regression_metrics()[index]
    first.update(mean[:40], var[:40], y[:40])
    second.update(mean[40:], var[40:], y[40:])
    same(first.merge(second).compute(), whole.compute())


def test_functions_equal_accumulators() -> None:
    probs, labels = random_problem(80, 3, 12)
    mean, var, y = regression_problem(80, 12)
    acc = M.ECE(10, norm="l2", classwise=True)
    acc.update(probs, labels)
    assert acc.compute() == M.ece(probs, labels, 10, norm="l2", classwise=True)
    cov = M.Coverage(0.7)
    cov.update(mean, var, y)
    assert cov.compute() == M.coverage(mean, var, y, 0.7)
    sharp = M.Sharpness()
    sharp.update(var[:30])
    sharp.merge(M.Sharpness()).update(var[30:])
    assert sharp.compute() == pytest.approx(M.sharpness(var), rel=TOL)


def test_adaptive_stream_equals_exact_when_sub_bins_hold_one_sample() -> None:
    # binary P(y = 1) above ½ is the top-label confidence; one sample per sub-bin centre
    g = torch.Generator().manual_seed(13)
    sub = torch.randperm(1024, generator=g)[:37] + 1024
    p1 = (sub.double() + 0.5) / 2048
    labels = torch.randint(0, 2, (37,), generator=g)
    for norm in ("l1", "l2", "max"):
        stream = M.ECE(5, norm=norm, adaptive=True, n_sub_bins=2048)
        stream.update(p1, labels)
        exact = M.ece(p1, labels, 5, norm=norm, adaptive=True)
        assert stream.compute() == pytest.approx(exact, abs=TOL)
    rel = M.Reliability(5, adaptive=True, n_sub_bins=2048)
    rel.update(p1, labels)
    exact_d = M.reliability(p1, labels, 5, adaptive=True)
    streamed = rel.compute()
    torch.testing.assert_close(streamed.count, exact_d.count)
    torch.testing.assert_close(streamed.accuracy, exact_d.accuracy)
    torch.testing.assert_close(streamed.confidence, exact_d.confidence)


@pytest.mark.parametrize("classwise", [False, True])
def test_adaptive_stream_within_sub_bin_resolution(classwise: bool) -> None:
    # Each equal-mass bin edge may misplace at most the samples of one sub-bin, and moving
    # one sample between bins changes the l1 ECE by at most 2/N, so the streamed value is
    # within 2 (n_bins − 1) max_k count_k / N of the exact one (per class, hence on average).
    probs, labels = random_problem(600, 3, 14)
    probs = (probs * 200).round() / 200  # coarse values: many ties, crowded sub-bins
    probs = probs / probs.sum(1, keepdim=True)
    n_bins, n_sub = 10, 256
    stream = M.ECE(n_bins, adaptive=True, classwise=classwise, n_sub_bins=n_sub)
    stream.update(probs, labels)
    exact = M.ece(probs, labels, n_bins, adaptive=True, classwise=classwise)
    crowd = float(stream.state()[2].max())
    assert crowd > 1
    assert abs(stream.compute() - exact) <= 2 * (n_bins - 1) * crowd / 600


def test_classwise_state_allocation() -> None:
    lazy = M.ECE(classwise=True)
    with pytest.raises(ValueError, match="n_classes"):
        lazy.state()
    eager = M.ECE(classwise=True, n_classes=3)
    assert eager.state()[0].shape == (3, 15)
    probs, labels = random_problem(30, 3, 15)
    eager.update(probs, labels)
    assert lazy.merge(eager).compute() == eager.compute()
    with pytest.raises(ValueError, match="3 classes"):
        M.ECE(classwise=True, n_classes=3).update(*random_problem(5, 4, 15))
    binary = M.ECE(classwise=True, n_classes=2)
    binary.update(probs[:, 1] / probs[:, :2].sum(1), labels.clamp_max(1))  # (B,): 2 classes
    assert binary.state()[0].shape == (2, 15)


def test_merge_rejects_mismatches() -> None:
    with pytest.raises(ValueError, match="different options"):
        M.ECE(10).merge(M.ECE(15))
    with pytest.raises(ValueError, match="different options"):
        M.Coverage(0.9).merge(M.Coverage(0.8))
    with pytest.raises(TypeError, match="same kind"):
        M.Accuracy().merge(M.NLL())  # type: ignore[arg-type]
    binary, multi = M.Brier(), M.Brier()
    binary.update(torch.tensor([0.3]), torch.tensor([1]))
    multi.update(torch.tensor([[0.3, 0.7]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="layout"):
        binary.merge(multi)
    with pytest.raises(ValueError, match="layout"):
        binary.update(torch.tensor([[0.3, 0.7]]), torch.tensor([1]))


def test_reset_and_empty_compute() -> None:
    metric = M.NLL()
    with pytest.raises(ValueError, match="no samples"):
        metric.compute()
    metric.update(torch.tensor([[0.5, 0.5]]), torch.tensor([0]))
    metric.reset_()
    with pytest.raises(ValueError, match="no samples"):
        metric.compute()
    with pytest.raises(ValueError, match="no samples"):
        M.ece(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_accumulators_follow_the_input_device(device: str) -> None:
    probs, labels = random_problem(40, 3, 16)
    metric = M.ECE(10, classwise=True, n_classes=3)
    metric.update(probs.to(device), labels.to(device))
    assert metric.state()[0].device.type == device
    assert metric.compute() == pytest.approx(M.ece(probs, labels, 10, classwise=True), abs=TOL)
    mean, var, y = (t.to(device) for t in regression_problem(40, 16))
    crps = M.CRPS()
    crps.update(mean, var, y)
    assert crps.compute() == pytest.approx(M.crps_gaussian(*(t.cpu() for t in (mean, var, y))))
    idle = M.Accuracy().to_(device)  # a rank with no data, ready for an all-reduce
    assert all(t.device.type == device for t in idle.state())


# --------------------------------------------------------------------------- validation

GOOD_P = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
GOOD_Y = torch.tensor([1, 0])


@pytest.mark.parametrize(
    ("probs", "labels", "error", "match"),
    [
        (torch.tensor([[0.2, 0.7], [0.5, 0.5]]), GOOD_Y, ValueError, "sum to 1"),
        (torch.tensor([[-0.2, 1.2], [0.5, 0.5]]), GOOD_Y, ValueError, r"\[0, 1\]"),
        (torch.tensor([[2.0, -1.0], [3.0, 1.0]]), GOOD_Y, ValueError, "logits"),
        (torch.tensor([[0.2], [0.5]]), GOOD_Y, ValueError, "C >= 2"),
        (torch.tensor([[0.5, float("nan")], [0.5, 0.5]]), GOOD_Y, ValueError, "NaN"),
        (GOOD_P, torch.tensor([1, 2]), ValueError, r"\[0, 1\]"),
        (GOOD_P, torch.tensor([1, -1]), ValueError, "lie in"),
        (GOOD_P, torch.tensor([1, 0, 1]), ValueError, "shape"),
        (GOOD_P, torch.tensor([0.5, 1.0]), ValueError, "integer"),
        ([[0.2, 0.8]], GOOD_Y, TypeError, "numpy"),
        (GOOD_P, [1, 0], TypeError, "Tensor"),
    ],
)
def test_classification_inputs_are_validated(
    probs: object, labels: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        M.ece(probs, labels)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        M.Brier().update(probs, labels)  # type: ignore[arg-type]


def test_options_and_regression_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match=r"\['l1', 'l2', 'max'\]"):
        M.ECE(norm="l3")
    with pytest.raises(ValueError, match="n_bins"):
        M.ece(GOOD_P, GOOD_Y, 0)
    with pytest.raises(ValueError, match="n_sub_bins"):
        M.ECE(20, adaptive=True, n_sub_bins=10)
    assert M.ECE(4000).n_bins == 4000  # n_sub_bins only bounds adaptive bins
    with pytest.raises(ValueError, match="class_index"):
        M.reliability(GOOD_P, GOOD_Y, class_index=2)
    with pytest.raises(ValueError, match="level"):
        M.Coverage(1.0)
    with pytest.raises(ValueError, match="levels"):
        M.calibration_error(torch.zeros(2), torch.ones(2), torch.zeros(2), levels=[0.5, 0.0])
    with pytest.raises(ValueError, match="positive"):
        M.gaussian_nll(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.zeros(2))
    with pytest.raises(ValueError, match="broadcast"):
        M.crps_gaussian(torch.zeros(2), torch.ones(3), torch.zeros(2))
    with pytest.raises(ValueError, match="y must have"):
        M.coverage(torch.zeros(2), torch.ones(2), torch.zeros(3))
    with pytest.raises(ValueError, match="positive"):
        M.sharpness(torch.zeros(2))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        M.ood_auroc(torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="tpr"):
        M.fpr_at_95_tpr(torch.zeros(2), torch.zeros(2), tpr=0.0)
    with pytest.raises(ValueError, match=r"\(S, B, C\)"):
        M.mutual_information(torch.ones(3))


# --------------------------------------------------------------------------- properties


@st.composite
def problems(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Probabilities (with exact zeros and ties), labels and a permutation."""
    n = draw(st.integers(1, 30))
    c = draw(st.integers(2, 5))
    weights = draw(hnp.arrays(np.float64, (n, c), elements=st.sampled_from([0.0, 0.5, 1, 2, 7])))
    weights[:, 0] += 1e-3  # no all-zero rows
    labels = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, c - 1)))
    order = draw(st.permutations(range(n)))
    return weights / weights.sum(1, keepdims=True), labels, order


@HYPOTHESIS
@given(problems(), st.sampled_from(["l1", "l2", "max"]), st.booleans(), st.booleans())
def test_ece_is_permutation_invariant_and_in_range(
    problem: tuple[np.ndarray, np.ndarray, list[int]], norm: str, classwise: bool, adaptive: bool
) -> None:
    probs, labels, order = problem
    value = M.ece(probs, labels, 5, norm=norm, classwise=classwise, adaptive=adaptive)
    assert 0.0 <= value <= 1.0
    permuted = M.ece(probs[order], labels[order], 5, norm=norm, classwise=classwise,
                     adaptive=adaptive)  # fmt: skip
    assert permuted == pytest.approx(value, abs=TOL)
    assert M.brier(probs[order], labels[order]) == pytest.approx(M.brier(probs, labels))
    assert M.nll(probs[order], labels[order]) == pytest.approx(M.nll(probs, labels))


@HYPOTHESIS
@given(
    hnp.arrays(np.float64, st.integers(1, 20), elements=st.integers(-3, 3).map(float)),
    hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(-3, 3)),
    st.randoms(use_true_random=False),
)
def test_auroc_in_range_and_permutation_invariant(
    s_in: np.ndarray, s_out: np.ndarray, rng: object
) -> None:
    value = M.ood_auroc(s_in, s_out)
    assert 0.0 <= value <= 1.0
    assert 0.0 <= M.ood_aupr(s_in, s_out) <= 1.0
    assert 0.0 <= M.fpr_at_95_tpr(s_in, s_out) <= 1.0
    shuffled = s_in.copy()
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    assert M.ood_auroc(shuffled, s_out[::-1].copy()) == pytest.approx(value, abs=TOL)
    # AUROC(in, out) + AUROC(out, in) = 1 (ties count ½ both ways)
    assert M.ood_auroc(s_out, s_in) == pytest.approx(1 - value, abs=TOL)


@HYPOTHESIS
@given(problems(), st.integers(1, 4))
def test_entropy_and_mutual_information_bounds(
    problem: tuple[np.ndarray, np.ndarray, list[int]], n_samples: int
) -> None:
    probs = problem[0]
    c = probs.shape[1]
    h = M.entropy(probs)
    assert bool((h >= 0).all()) and bool((h <= math.log(c) + TOL).all())
    samples = np.stack([np.roll(probs, shift, axis=1) for shift in range(n_samples)])
    out = M.mutual_information(samples)
    assert bool((out.epistemic >= 0).all())
    assert bool((out.total <= math.log(c) + TOL).all())
    torch.testing.assert_close(out.total - out.aleatoric, out.epistemic, atol=TOL, rtol=0)


# --------------------------------------------------------------------------- docs


@pytest.mark.parametrize("module", [classification, regression, uncertainty])
def test_docstring_examples(module: object) -> None:
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags)  # type: ignore[arg-type]
    assert result.failed == 0
