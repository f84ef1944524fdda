"""Token-level classification (language-model heads): logits ``(B, T, C)``, labels
``(B, T)`` with ``ignore_index = -100``; every kept token is one datum.

Oracle: per-datum Jacobians of every token's logits (torch.autograd, float64) and the
per-token loss Hessian / gradient, summed over kept tokens only.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from helpers import assert_close, generator
from torch import Tensor, nn

from laplacefim import Laplace

DTYPE = torch.float64
RTOL = 1e-10
N_SEQ, T, C, VOCAB = 6, 3, 5, 7
MC_SAMPLES = 20_000
MC_RTOL = 0.03  # relative Frobenius error of the MC Fisher at 20,000 labels per token


class TinyLM(nn.Module):
    """Embedding → prefix sums (a token depends on the earlier ones) → tanh → per-token head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4, dtype=DTYPE)
        self.mix = nn.Linear(4, 4, dtype=DTYPE)
        self.head = nn.Linear(4, C, dtype=DTYPE)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids).cumsum(1))))


def _problem():
    g = generator(11)
    model = ref.init_(TinyLM(), g)
    ids = torch.randint(0, VOCAB, (N_SEQ, T), generator=g)
    labels = torch.randint(0, C, (N_SEQ, T), generator=g)
    labels[0, 2] = labels[3, 0] = -100
    return model, ids, labels


def _references(model: nn.Module, ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The token-level GGN and empirical Fisher over kept tokens, ``(P, P)`` each."""
    names = ref.trainable_names(model)
    f = ref.functional(model, names)
    theta = ref.flat_params(model, names)
    jac = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda t, n=n: f(t, ids[n : n + 1])[0], theta)
            for n in range(N_SEQ)
        ]
    )  # (B, T, C, P)
    with torch.no_grad():
        p = model(ids).softmax(-1)
    hessian = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
    kept = (labels != -100).to(DTYPE)
    ggn = torch.einsum("btcp,btcd,btdq,bt->pq", jac, hessian, jac, kept)
    residual = p - nn.functional.one_hot(labels.clamp_min(0), C).to(DTYPE)
    grads = torch.einsum("btcp,btc->btp", jac, residual)
    return ggn, torch.einsum("btp,btq,bt->pq", grads, grads, kept)


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_token_level_curvature_is_exact(structure):
    model, ids, labels = _problem()
    ggn, ef = _references(model, ids, labels)
    for kind, expected in (("ggn", ggn), ("empirical_fisher", ef)):
        la = Laplace(model, structure=structure, curvature=kind, prior_precision=0.0)
        la.fit(ref.loader(ids, labels, 4))
        assert la.n_data == N_SEQ * T - 2
        dense = la.curvature.to_dense()
        if structure == "diag":
            expected = torch.diag(expected.diagonal())
        assert_close(dense, expected, RTOL)


def test_token_level_mc_fisher_is_unbiased():
    """One sampled label per token, backpropagated together: cross-token terms vanish in
    expectation (scores have mean zero), so the estimate converges to the GGN."""
    model, ids, labels = _problem()
    ggn, _ = _references(model, ids, labels)
    la = Laplace(model, structure="full", curvature="fisher", fisher_samples=MC_SAMPLES)
    la.fit(ref.loader(ids, labels, 4), generator=generator(1))
    error = (la.curvature.to_dense() - ggn).norm() / ggn.norm()
    assert error < MC_RTOL, error


def test_token_level_predictions_match_the_dense_glm():
    model, ids, labels = _problem()
    la = Laplace(model, structure="full", prior_precision=0.7).fit(ref.loader(ids, labels, 4))
    names = ref.trainable_names(model)
    f = ref.functional(model, names)
    theta = ref.flat_params(model, names)
    x = ids[:2]
    jac = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda t, n=n: f(t, x[n : n + 1]).reshape(-1), theta)
            for n in range(2)
        ]
    )  # (B, T·C, P)
    covariance = torch.linalg.inv(la.posterior_precision.to_dense())
    expected = torch.einsum("bip,pq,bjq->bij", jac, covariance, jac)
    prediction = la.predict(x, joint_outputs=True)
    assert prediction.probs.shape == (2, T, C)
    assert_close(prediction.logit_cov, expected, 1e-9)
    variances = expected.diagonal(dim1=1, dim2=2).reshape(2, T, C)  # token t, class c
    assert_close(prediction.logit_var, variances, 1e-9)
    logits = model(x).detach()
    probit = (logits / torch.sqrt(1 + torch.pi / 8 * prediction.logit_var)).softmax(-1)
    assert_close(prediction.probs, probit, 1e-9)
    samples = la.predictive_samples(x, 4, generator=generator(2))
    assert samples.shape == (4, 2, T, C)


def test_token_level_targets_are_checked():
    model, ids, labels = _problem()
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        Laplace(model).fit([(ids, labels[:, :2])])
    bad = labels.clone()
    bad[1, 1] = C  # out of range and not ignored
    with pytest.raises(ValueError, match="out of range"):
        Laplace(model).fit([(ids, bad)])


def test_gpt2_language_model_head_with_tied_embeddings():
    """A GPT-2-like LM (its output layer is tied to the token embedding) from a config:
    the token-level GGN over every parameter equals the dense reference."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        vocab_size=11, n_embd=4, n_layer=1, n_head=2, n_positions=8,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config).double().eval()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    g = generator(12)
    ids = torch.randint(0, 11, (4, 5), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], 1)  # next token; last ignored
    batches = [{"input_ids": ids[i : i + 2], "labels": labels[i : i + 2]} for i in (0, 2)]
    names = ref.trainable_names(model)
    params = dict(model.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def logits(t: Tensor, n: int) -> Tensor:
        parts = dict(zip(names, t.split([params[k].numel() for k in names]), strict=True))
        new = {k: v.reshape(params[k].shape) for k, v in parts.items()}
        out = torch.func.functional_call(model, new, (), {"input_ids": ids[n : n + 1]})
        return out.logits[0]

    jac = torch.stack(
        [torch.autograd.functional.jacobian(lambda t, n=n: logits(t, n), theta) for n in range(4)]
    )
    with torch.no_grad():
        p = model(input_ids=ids).logits.softmax(-1)
    hessian = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
    kept = (labels != -100).to(DTYPE)
    expected = torch.einsum("btcp,btcd,btdq,bt->pq", jac, hessian, jac, kept)
    la = Laplace(
        model, structure="full", prior_precision=0.0, y_key="labels", call_kwargs=True,
        output_key="logits", max_full_params=5000,
    )  # fmt: skip
    la.fit(batches)
    assert la.n_data == 16  # 4 sequences x 5 tokens, the last of each ignored
    scale = float(expected.abs().max())
    assert_close(la.curvature.to_dense(), expected, 1e-9, 1e-9 * scale)
