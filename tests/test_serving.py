"""The in-process serving API: Predictor results against la.predict and independent
formulas, selective-prediction metrics against brute force, abstention calibration."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import assert_close, generator
from serving_models import BagOfTokens
from torch import nn

from laplacefim import Laplace
from laplacefim.metrics.selective import aurc, risk_coverage
from laplacefim.serving import AbstentionRule, InputError, Predictor
from laplacefim.serving.scores import MI_SAMPLES, shared_normals

DT = torch.float64


def _trained(n_out: int, seed: int, n: int = 240) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = generator(seed)
    x = torch.randn(n, 5, generator=g, dtype=DT)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, n_out)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=DT))
    return model, x, g  # type: ignore[return-value]


def _classifier(seed: int = 0, subset: str = "all") -> tuple[Laplace, torch.Tensor, torch.Tensor]:
    model, x, _ = _trained(3, seed)
    y = model(x).argmax(-1).detach()
    y[::7] = (y[::7] + 1) % 3  # some errors, so that the risk is not zero
    la = Laplace(model, "classification", subset=subset, structure="kron")
    la.fit([(x[:160], y[:160])])
    la.prior_precision = 2.0
    return la, x, y


# ----------------------------------------------------------------------------- selective metrics
def _brute_force_curve(u: torch.Tensor, loss: torch.Tensor) -> tuple[list, list, list]:
    thresholds, coverage, risk = [], [], []
    for t in sorted(set(u.tolist())):
        kept = u <= t
        thresholds.append(t)
        coverage.append(float(kept.double().mean()))
        risk.append(float(loss[kept].double().mean()))
    return thresholds, coverage, risk


def test_risk_coverage_matches_brute_force_with_ties():
    g = generator(3)
    u = torch.randint(0, 12, (200,), generator=g).double() / 4  # many ties
    loss = torch.rand(200, generator=g, dtype=DT)
    curve = risk_coverage(u, loss)
    thresholds, coverage, risk = _brute_force_curve(u, loss)
    assert curve.thresholds.tolist() == thresholds
    assert_close(curve.coverage, torch.tensor(coverage, dtype=DT), 1e-12)
    assert_close(curve.risk, torch.tensor(risk, dtype=DT), 1e-12)
    previous, area = 0.0, 0.0
    for c, r in zip(coverage, risk, strict=True):
        area += (c - previous) * r
        previous = c
    assert curve.aurc == pytest.approx(area, rel=1e-12)
    shuffled = torch.randperm(200, generator=g)
    assert aurc(u[shuffled], loss[shuffled]) == pytest.approx(curve.aurc, rel=1e-12)


def test_aurc_closed_forms():
    # a perfect ordering of 0/1 losses: the errors come last
    u = torch.arange(10.0)
    loss = torch.tensor([0.0] * 8 + [1.0] * 2)
    expected = sum((1 / 10) * (max(k - 8, 0) / k) for k in range(1, 11))
    assert aurc(u, loss) == pytest.approx(expected, rel=1e-12)
    # a constant score answers everything at once: the area is the error rate
    assert aurc(torch.zeros(10), loss) == pytest.approx(0.2, rel=1e-12)
    with pytest.raises(ValueError, match="same length"):
        aurc(torch.zeros(3), torch.zeros(4))


# ----------------------------------------------------------------------------- predictor
def test_predictor_equals_la_predict_and_scores_match_formulas():
    la, x, _ = _classifier()
    predictor = Predictor(la.model, la, batch_size=17)
    results = predictor.predict(x[160:])
    pred = la.predict(x[160:], joint_outputs=True)
    probs = torch.tensor([r.probabilities for r in results], dtype=DT)
    assert_close(probs, pred.probs, 1e-12)
    assert [r.prediction for r in results] == pred.probs.argmax(-1).tolist()
    entropy = -(pred.probs * pred.probs.log()).sum(-1)
    got = torch.tensor([r.uncertainty["entropy"] for r in results], dtype=DT)
    assert_close(got, entropy, 1e-10)
    top = torch.tensor([r.uncertainty["max_probability"] for r in results], dtype=DT)
    assert_close(top, pred.probs.amax(-1), 1e-12)
    # mutual information: the same logit draws, by an explicit loop over inputs and draws
    normals = shared_normals(3)
    expected = []
    for mean, cov in zip(pred.logit_mean, pred.logit_cov, strict=True):
        chol = torch.linalg.cholesky(cov + 1e-10 * cov.diagonal().mean() * torch.eye(3, dtype=DT))
        p = torch.stack([torch.softmax(mean + chol @ z, -1) for z in normals])
        h_mean = -(p.mean(0) * p.mean(0).log()).sum()
        expected.append(h_mean - (-(p * p.log()).sum(-1)).mean())
    mi = torch.tensor([r.uncertainty["mutual_information"] for r in results], dtype=DT)
    assert_close(mi, torch.stack(expected), 1e-9)
    assert [r.ood_score for r in results] == mi.tolist()
    assert normals.shape == (MI_SAMPLES, 3)
    assert all(r.abstain is None for r in results)  # no rule calibrated


def test_predictor_answers_do_not_depend_on_the_batch():
    la, x, _ = _classifier()
    predictor = Predictor(la.model, la, batch_size=5)
    together = predictor.predict(x[160:180])
    alone = [predictor.predict(x[i : i + 1])[0] for i in range(160, 180)]
    for a, b in zip(together, alone, strict=True):
        assert a.prediction == b.prediction
        assert a.probabilities == pytest.approx(b.probabilities, rel=1e-12)
        assert a.uncertainty == pytest.approx(b.uncertainty, rel=1e-9, abs=1e-12)


def test_predictor_is_thread_safe():
    la, x, _ = _classifier()
    predictor = Predictor(la.model, la, batch_size=8)
    expected = [r.probabilities for r in predictor.predict(x)]
    answers: dict[int, list] = {}

    def work(index: int) -> None:
        rows = slice(index * 20, index * 20 + 20)
        answers[index] = [r.probabilities for r in predictor.predict(x[rows])]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for index in range(12):
        got = torch.tensor(answers[index], dtype=DT)
        assert_close(got, torch.tensor(expected[index * 20 : index * 20 + 20], dtype=DT), 1e-12)


@pytest.mark.parametrize("likelihood", ["regression", "heteroscedastic"])
def test_predictor_regression_splits_the_variance(likelihood):
    n_out = 2 if likelihood == "regression" else 4
    model, x, g = _trained(n_out, 1)
    y = torch.randn(240, 2, generator=g, dtype=DT)
    noise = {"sigma_noise": 0.5} if likelihood == "regression" else {}
    la = Laplace(model, likelihood, subset="all", structure="diag", **noise)
    la.fit([(x[:160], y[:160])])
    results = Predictor(model, la).predict(x[160:])
    pred = la.predict(x[160:])
    assert_close(torch.tensor([r.prediction for r in results], dtype=DT), pred.mean, 1e-12)
    epistemic = torch.tensor([r.variance["epistemic"] for r in results], dtype=DT)
    aleatoric = torch.tensor([r.variance["aleatoric"] for r in results], dtype=DT)
    assert_close(epistemic, pred.epistemic_var, 1e-12)
    assert_close(aleatoric, pred.aleatoric_var, 1e-12)
    total = torch.tensor([r.uncertainty["total_variance"] for r in results], dtype=DT)
    assert_close(total, (pred.epistemic_var + pred.aleatoric_var).sum(-1), 1e-12)
    assert [r.ood_score for r in results] == pytest.approx(pred.epistemic_var.sum(-1).tolist())
    if likelihood == "regression":  # the homoscedastic noise is σ² everywhere
        assert_close(aleatoric, torch.full_like(aleatoric, 0.25), 1e-12)


def test_predictor_binary_reports_both_classes():
    model, x, _ = _trained(1, 2)
    y = (model(x)[:, 0] > 0).double().detach()
    la = Laplace(model, "binary", subset="last_layer", structure="full")
    la.fit([(x[:160], y[:160])])
    results = Predictor(model, la).predict(x[160:])
    p1 = la.predict(x[160:]).probs
    probs = torch.tensor([r.probabilities for r in results], dtype=DT)
    assert_close(probs, torch.stack([1 - p1, p1], 1), 1e-12)
    assert [r.prediction for r in results] == (p1 > 0.5).long().tolist()
    assert all(r.uncertainty["mutual_information"] >= 0 for r in results)


def test_map_only_predictor_is_the_network():
    model, x, _ = _trained(3, 4)
    results = Predictor(model, likelihood="classification").predict(x[:10])
    probs = torch.tensor([r.probabilities for r in results], dtype=DT)
    assert_close(probs, model(x[:10]).softmax(-1).detach(), 1e-12)
    assert all(r.uncertainty["mutual_information"] == 0.0 for r in results)
    with pytest.raises(ValueError, match="likelihood="):
        Predictor(model)


def test_predictor_takes_mapping_inputs():
    g = generator(5)
    model = BagOfTokens().to(DT)
    ids = torch.randint(0, 20, (64, 7), generator=g)
    mask = torch.ones(64, 7, dtype=torch.long)
    mask[::3, 5:] = 0
    y = torch.randint(0, 2, (64,), generator=g)
    la = Laplace(model, "classification", subset="last_layer", call_kwargs=True)
    la.fit([({"input_ids": ids, "attention_mask": mask}, y)])
    predictor = Predictor(model, la)
    entries = [
        {"input_ids": i.tolist(), "attention_mask": m.tolist()}
        for i, m in zip(ids, mask, strict=True)
    ]
    results = predictor.predict(entries[:9])
    expected = la.predict({"input_ids": ids[:9], "attention_mask": mask[:9]}).probs
    assert_close(torch.tensor([r.probabilities for r in results], dtype=DT), expected, 1e-12)
    reordered = [
        {"attention_mask": e["attention_mask"], "input_ids": e["input_ids"]} for e in entries
    ]
    assert predictor.predict(reordered[:9]) == results  # JSON objects have no key order
    with pytest.raises(InputError, match="same keys"):
        predictor.prepare([entries[0], {"input_ids": entries[1]["input_ids"]}])


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([], "empty"),
        ([[0.0] * 4], "shape"),
        ([[0.0] * 5, [0.0] * 4], "one shape"),
        ([[float("nan")] * 5], "NaN"),
        ([["a"] * 5], "numbers"),
        ([[True] * 5], "booleans"),
        ([{"a": [1]}, [0.0] * 5], "mix"),
    ],
)
def test_prepare_refuses_bad_entries(entries, match):
    la, _, _ = _classifier()
    with pytest.raises(InputError, match=match):
        Predictor(la.model, la).prepare(entries)


# ----------------------------------------------------------------------------- abstention
def test_abstention_by_coverage_is_chosen_on_the_curve_and_saved(tmp_path):
    la, x, y = _classifier()
    val = [(x[160:200], y[160:200]), (x[200:], y[200:])]
    report = la.calibrate_abstention(val, target_coverage=0.8)
    rule = report.rule
    pred = la.predict(x[160:])
    confidence = pred.probs.amax(-1)
    errors = (pred.probs.argmax(-1) != y[160:]).double()
    answered = confidence >= rule.threshold
    assert rule.coverage == pytest.approx(float(answered.double().mean()))
    assert rule.coverage >= 0.8
    assert rule.risk == pytest.approx(float(errors[answered].mean()))
    # the smallest coverage of at least 0.8: raising the threshold past the next score drops it
    above = confidence[confidence > rule.threshold]
    if above.numel():
        assert float((confidence >= above.min()).double().mean()) < 0.8
    assert rule.aurc == pytest.approx(aurc(-confidence, errors), rel=1e-9)
    assert report.optimal_aurc <= rule.aurc
    flags = [r.abstain for r in Predictor(la.model, la).predict(x[160:])]
    assert flags == (~answered).tolist()
    la.save(tmp_path / "la.pt")
    loaded = Laplace.load(tmp_path / "la.pt", la.model)
    assert loaded.abstention == rule
    la.prior_precision = 3.0  # the predictive changed: the rule no longer holds
    assert la.abstention is None


def test_abstention_by_risk_and_its_errors():
    la, x, y = _classifier()
    val = [(x[160:], y[160:])]
    report = la.calibrate_abstention(val, target_risk=0.05, score="entropy")
    pred = la.predict(x[160:])
    entropy = -(pred.probs * pred.probs.log()).sum(-1)
    errors = (pred.probs.argmax(-1) != y[160:]).double()
    answered = entropy <= report.rule.threshold
    assert float(errors[answered].mean()) <= 0.05
    curve = report.curve
    larger = curve.coverage > report.rule.coverage
    assert bool((curve.risk[larger] > 0.05).all())  # no larger coverage meets the risk
    all_wrong = [(x[160:], (pred.probs.argmax(-1) + 1) % 3)]
    with pytest.raises(ValueError, match="lowest on these data is 1 "):
        la.calibrate_abstention(all_wrong, target_risk=0.5, score="mutual_information")
    with pytest.raises(ValueError, match="exactly one"):
        la.calibrate_abstention(val)
    with pytest.raises(ValueError, match="does not apply"):
        la.calibrate_abstention(val, target_coverage=0.9, score="total_variance")
    with pytest.raises(ValueError, match="no batches"):
        la.calibrate_abstention([], target_coverage=0.9)


def test_abstention_rule_round_trips_as_plain_values():
    rule = AbstentionRule("entropy", 0.4, 0.9, None, 0.91, 0.02, 0.015, 100)
    assert AbstentionRule.from_state(rule.to_state()) == rule
    scores = {"entropy": torch.tensor([0.1, 0.4, 0.41], dtype=DT)}
    assert rule.abstains(scores).tolist() == [False, False, True]


def test_regression_abstention_uses_the_squared_error():
    model, x, g = _trained(2, 7)
    y = model(x).detach() + 0.3 * torch.randn(240, 2, generator=g, dtype=DT)
    la = Laplace(model, "regression", subset="all", structure="kron", sigma_noise=0.3)
    la.fit([(x[:160], y[:160])])
    report = la.calibrate_abstention([(x[160:], y[160:])], target_coverage=0.75)
    pred = la.predict(x[160:])
    total = (pred.epistemic_var + pred.aleatoric_var).sum(-1)
    answered = total <= report.rule.threshold
    squared = ((pred.mean - y[160:]) ** 2).sum(-1)
    assert report.rule.score == "total_variance"
    assert report.rule.coverage == pytest.approx(float(answered.double().mean()))
    assert report.rule.coverage >= 0.75
    assert report.rule.risk == pytest.approx(float(squared[answered].mean()), rel=1e-10)
    flags = [r.abstain for r in Predictor(model, la).predict(x[160:])]
    assert flags == (~answered).tolist()


def test_in_place_edits_of_the_prior_are_seen_and_inputs_are_copied():
    la, x, _ = _classifier()
    before = la.predict(x[:5]).logit_var
    la.prior_precision.mul_(100)  # in place, on the tensor la holds
    fresh = Laplace(la.model, "classification", subset="all", structure="kron")
    fresh.fit([(x[:160], la.model(x[:160]).argmax(-1).detach())])
    fresh.load_state_dict(la.state_dict())
    assert_close(la.predict(x[:5]).logit_var, fresh.predict(x[:5]).logit_var, 1e-12)
    assert not torch.allclose(la.predict(x[:5]).logit_var, before)
    mine = torch.tensor(3.0, dtype=DT)
    la.prior_precision = mine
    mine.fill_(1000.0)  # the caller's tensor stays the caller's
    assert float(la.prior_precision) == 3.0


def test_predictor_follows_the_posterior_rule_and_checks_its_own():
    la, x, y = _classifier()
    la.calibrate_abstention([(x[160:], y[160:])], target_coverage=0.9)
    predictor = Predictor(la.model, la)
    assert predictor.rule == la.abstention
    la.prior_precision = 5.0  # drops the rule: the predictor must not keep using it
    assert predictor.rule is None
    assert predictor.predict(x[:2])[0].abstain is None
    wrong = AbstentionRule("total_variance", 1.0, 0.9, None, 0.9, 0.1, 0.1, 10)
    with pytest.raises(ValueError, match="does not have"):
        Predictor(la.model, la, abstain=wrong)
    with pytest.raises(InputError, match="empty"):
        predictor.predict(x[:0])


def test_prepare_keeps_float64_numbers_exact():
    la, _, _ = _classifier()
    entries = [[0.1, 0.2, 0.3, 1e-17 + 1.0, 1 / 3]]
    x = Predictor(la.model, la).prepare(entries)
    assert x.dtype == DT and x.tolist() == entries


def test_batcher_answers_what_was_queued_and_refuses_after_stop():
    import asyncio

    from laplacefim.serving.batcher import MicroBatcher

    la, x, _ = _classifier()
    predictor = Predictor(la.model, la)

    async def scenario() -> tuple[list, str]:
        batcher = MicroBatcher(predictor.score, max_batch=4, max_wait=0.01)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(x[i : i + 3])) for i in range(0, 18, 3)]
        await asyncio.sleep(0)  # they are queued
        await batcher.stop()
        answers = await asyncio.gather(*pending)
        try:
            await batcher.submit(x[:1])
        except RuntimeError as error:
            return answers, str(error)
        return answers, ""

    answers, refusal = asyncio.run(scenario())
    expected = la.predict(x[:18]).probs
    got = torch.cat([a.probabilities for a in answers])
    assert_close(got, expected, 1e-12)
    assert "not running" in refusal
