"""Curvature on real architectures, end to end through ``Laplace``, against dense brute force.

Every expected number comes from this file or ``reference.py`` (nothing from laplacefim):
the exact GGN ``G = Σₙ Jₙᵀ Λₙ Jₙ`` with ``Jₙ`` the per-datum Jacobian of the outputs in the
chosen parameters (one datum at a time, ``torch.autograd.functional.jacobian`` through
``torch.func.functional_call``) and ``Λₙ`` the loss Hessian in the outputs
(``reference.loss_hessian_outputs``). The package's ``"full"`` curvature must equal ``G``,
``"diag"`` its diagonal, ``"kron"`` the exact diagonal on parameters without a Kronecker
form, and ``"ekfac"`` is never further from ``G`` than ``"kron"``, block by block.

Architectures: ``nn.TransformerEncoder`` (post-norm, with a key padding mask, pre-norm;
sequence-first layers are refused today, marked xfail), ``nn.LSTM`` / ``nn.GRU`` (two
layers, uni- and bidirectional), tied embedding / output weights, position embeddings
broadcast over the batch, models taking and returning mappings / tuples / objects,
HuggingFace BERT and GPT-2 from small configs, LoRA adapters from peft; and the models the
engine must refuse, naming the parameter.

Tiny float64 models, local generators only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from helpers import assert_close, generator
from torch import Tensor, nn
from torch.func import functional_call

from laplacefim import Laplace

DTYPE = ref.DTYPE
# Dense float64 brute force against the package's batched column backpropagation and its
# structured blocks: float64 reassociation only (entries compared on the scale of max|G|,
# since some entries, e.g. an attention key bias's, are exactly 0 up to rounding).
EXACT_RTOL = 1e-9
# "ekfac is never further from G than kron": the two Frobenius distances agree to rounding
# on blocks where EKFAC equals KFAC (diagonal blocks).
FROB_SLACK = 1e-9
# The tuned prior is a stationary point of the dense evidence in log δ: Newton stops at a
# predicted gain of 1e-10, so the derivative there is ~1e-5; allowed relative to P.
STATIONARY_RTOL = 1e-4
# Dense inverses and log-determinants of the posterior precision (δ down to 1e-2).
DENSE_RTOL = 1e-9
# Central finite difference in log δ of the dense evidence (smooth, O(h²) error).
FD_STEP = 1e-4
# Gridsearch: the dense oracle's best grid point must win by this relative margin, so the
# choice is not decided by rounding.
GRID_MARGIN = 1e-6
NO_LIMIT = 100_000  # max_full_params large enough for every model here


# --------------------------------------------------------------------------------------
# the dense reference
# --------------------------------------------------------------------------------------
def _tensor_call(fn: Callable, x: object) -> Tensor:
    return fn(x)


def per_datum_jacobian(
    model: nn.Module,
    names: Sequence[str],
    rows: Sequence[object],
    call: Callable[[Callable, object], Tensor] = _tensor_call,
) -> tuple[Tensor, Tensor]:
    """Per-datum Jacobians ``(N, C, P)`` and outputs ``(N, C)``, one datum at a time.

    ``rows`` are single-datum inputs (a tensor with a leading 1, or a mapping of them);
    ``call(fn, row)`` runs the model-like ``fn`` on a row and returns the output tensor.
    Parameters are flattened in ``named_parameters`` order (tied ones appear once).
    """
    params = dict(model.named_parameters())
    order = [n for n, _ in model.named_parameters() if n in set(names)]
    assert len(order) == len(names)
    sizes = [params[n].numel() for n in order]
    theta = torch.cat([params[n].detach().reshape(-1) for n in order])

    def run(t: Tensor, row: object) -> Tensor:
        new = {n: p.reshape(params[n].shape) for n, p in zip(order, t.split(sizes), strict=True)}

        def fn(*args, **kwargs):
            return functional_call(model, new, args, kwargs)

        return call(fn, row).reshape(-1)

    jac, out = [], []
    for row in rows:
        jac.append(torch.autograd.functional.jacobian(lambda t, row=row: run(t, row), theta))
        with torch.no_grad():
            out.append(run(theta, row))
    return torch.stack(jac), torch.stack(out)


def dense_ggn_from(J: Tensor, f: Tensor, likelihood: str = "classification") -> Tensor:
    lam = ref.loss_hessian_outputs(likelihood, f)
    return torch.einsum("ncp,ncd,ndq->pq", J, lam, J)


def rows_of(x: object, n: int) -> list[object]:
    """Single-datum inputs of a tensor or a mapping of tensors with ``n`` rows."""
    if isinstance(x, Tensor):
        return [x[i : i + 1] for i in range(n)]
    return [{k: v[i : i + 1] for k, v in x.items()} for i in range(n)]


def batches_of(x: object, y: Tensor, size: int, y_key: str | None = None) -> list[object]:
    """(x, y) pairs, or mappings (inputs' keys plus ``y_key``), of ``size`` rows."""
    out = []
    for start in range(0, len(y), size):
        rows = slice(start, start + size)
        if y_key is None:
            out.append((x[rows], y[rows]))
        else:
            out.append({**{k: v[rows] for k, v in x.items()}, y_key: y[rows]})
    return out


def block_slices(la: Laplace) -> list[slice]:
    out, start = [], 0
    for block in la.curvature.blocks:
        out.append(slice(start, start + block.numel))
        start += block.numel
    return out


def name_slices(model: nn.Module, names: Sequence[str]) -> dict[str, slice]:
    return ref.param_slices(model, names)


def fit(model: nn.Module, batches: list[object], structure: str, **kw) -> Laplace:
    kw.setdefault("prior_precision", 1.0)
    la = Laplace(model, structure=structure, max_full_params=NO_LIMIT, **kw)
    return la.fit(batches)


def curvature(la: Laplace) -> Tensor:
    return la.curvature.to_dense().detach().to(DTYPE)


def check_full_and_diag(model: nn.Module, batches: list[object], G: Tensor, **kw) -> None:
    assert_close(curvature(fit(model, batches, "full", **kw)), G, EXACT_RTOL)
    diag = curvature(fit(model, batches, "diag", **kw))
    assert_close(diag, torch.diag(torch.diagonal(G)), EXACT_RTOL)


def check_exact_diagonal_blocks(K: Tensor, G: Tensor, slices: list[slice]) -> None:
    """``K`` holds the exact diagonal of ``G`` (and nothing else) on each slice's block."""
    scale = float(G.abs().max())
    for s in slices:
        expected = torch.diag(torch.diagonal(G[s, s]))
        assert_close(K[s, s], expected, EXACT_RTOL, atol=EXACT_RTOL * scale)


def check_ekfac_not_further_than_kron(kron: Laplace, ekfac: Laplace, G: Tensor) -> None:
    assert len(kron.curvature.blocks) == len(ekfac.curvature.blocks)
    pairs = zip(ekfac.curvature.blocks, kron.curvature.blocks, block_slices(ekfac), strict=True)
    for e, k, s in pairs:
        assert e.names == k.names and e.numel == k.numel
        exact = G[s, s]
        d_e = float(torch.linalg.matrix_norm(e.to_dense().to(DTYPE) - exact))
        d_k = float(torch.linalg.matrix_norm(k.to_dense().to(DTYPE) - exact))
        scale = float(torch.linalg.matrix_norm(exact))
        assert d_e <= d_k + FROB_SLACK * scale, (e.names, d_e, d_k)


# --------------------------------------------------------------------------------------
# 1. nn.TransformerEncoder
# --------------------------------------------------------------------------------------
D_IN, D_MODEL, N_CLASSES = 3, 8, 3


class EncoderClassifier(nn.Module):
    """Linear → 2 × TransformerEncoderLayer → mean over positions → Linear."""

    def __init__(self, batch_first: bool = True, norm_first: bool = False):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(D_IN, D_MODEL, dtype=DTYPE)
        layer = nn.TransformerEncoderLayer(
            D_MODEL,
            nhead=2,
            dim_feedforward=16,
            dropout=0.0,
            batch_first=batch_first,
            norm_first=norm_first,
            dtype=DTYPE,
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D_MODEL, N_CLASSES, dtype=DTYPE)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.inp(x)  # (B, T, d)
        if not self.batch_first:
            h = h.transpose(0, 1)  # (T, B, d)
        h = self.encoder(h, src_key_padding_mask=mask)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


TRANSFORMER_CASES = ["batch_first", "masked", "norm_first"]
N_SEQ, T_SEQ, BATCH = 6, 4, 4  # uneven last batch


def _transformer_problem(case: str, batch_first: bool = True):
    g = generator(11 + TRANSFORMER_CASES.index(case))
    model = EncoderClassifier(batch_first=batch_first, norm_first=case == "norm_first")
    ref.init_(model, g, 0.5)
    model.eval()
    x = torch.randn(N_SEQ, T_SEQ, D_IN, generator=g, dtype=DTYPE)
    y = torch.randint(0, N_CLASSES, (N_SEQ,), generator=g)
    if case == "masked":
        mask = torch.zeros(N_SEQ, T_SEQ, dtype=torch.bool)
        mask[0, -1] = mask[3, -2:] = mask[5, 1] = True  # padded key positions
        inputs = {"x": x, "mask": mask}
        return (
            model,
            inputs,
            batches_of(inputs, y, BATCH, y_key="y"),
            {"y_key": "y", "call_kwargs": True},
        )
    return model, x, batches_of(x, y, BATCH), {}


def _transformer_ggn(model: nn.Module, inputs: object) -> Tensor:
    names = ref.trainable_names(model)
    if isinstance(inputs, Tensor):
        J, f = per_datum_jacobian(model, names, rows_of(inputs, N_SEQ))
    else:
        J, f = per_datum_jacobian(model, names, rows_of(inputs, N_SEQ), lambda fn, r: fn(**r))
    return dense_ggn_from(J, f)


@pytest.fixture(scope="module")
def transformer_problems():
    """Each case's model, batches, io keywords and dense GGN, built once per module."""
    cache: dict[str, tuple] = {}

    def get(case: str):
        if case not in cache:
            model, inputs, batches, io = _transformer_problem(case)
            cache[case] = (model, batches, io, _transformer_ggn(model, inputs))
        return cache[case]

    return get


@pytest.mark.parametrize("case", TRANSFORMER_CASES)
def test_transformer_full_and_diag_equal_the_dense_ggn(transformer_problems, case):
    model, batches, io, G = transformer_problems(case)
    check_full_and_diag(model, batches, G, **io)


@pytest.mark.parametrize("case", TRANSFORMER_CASES)
def test_transformer_kron_and_ekfac(transformer_problems, case):
    """KFAC: LayerNorm scales and shifts get the exact diagonal of G; EKFAC: never further
    from G than KFAC on any block."""
    model, batches, io, G = transformer_problems(case)
    kron = fit(model, batches, "kron", **io)
    K = curvature(kron)
    assert K.shape == G.shape
    slices = name_slices(model, ref.trainable_names(model))
    norms = [
        slices[f"{prefix}.{p}"]
        for prefix, module in model.named_modules()
        if isinstance(module, nn.LayerNorm)
        for p in ("weight", "bias")
    ]
    assert len(norms) == 8  # two LayerNorms per layer, two layers
    check_exact_diagonal_blocks(K, G, norms)
    # the attention and feed-forward weights have Kronecker blocks
    kinds = {block.names: type(block).__name__ for block in kron.curvature.blocks}
    assert kinds[("encoder.layers.0.self_attn.in_proj_weight",)] == "KronBlock"
    assert kinds[("encoder.layers.1.linear2.weight",)] == "KronBlock"
    check_ekfac_not_further_than_kron(kron, fit(model, batches, "ekfac", **io), G)


# KNOWN LIMITATION (not a silent error: the engine refuses with a clear ValueError): with
# batch_first=False the encoder layer's own Linear / LayerNorm submodules see (T, B, d)
# tensors, and the Linear rule requires batch-first outputs ("Linear returned an output of
# shape (4, 3, 16) whose leading dimension is not the batch"). nn.MultiheadAttention alone
# supports batch_first=False. Remove the marker once sequence-first encoders are supported.
@pytest.mark.xfail(raises=ValueError, strict=True, reason="sequence-first encoder layers refused")
def test_transformer_sequence_first_with_padding_mask():
    model, inputs, batches, io = _transformer_problem("masked", batch_first=False)
    la = fit(model, batches, "full", **io)  # raises today, before any reference is computed
    assert_close(curvature(la), _transformer_ggn(model, inputs), EXACT_RTOL)


# --------------------------------------------------------------------------------------
# 2. nn.LSTM and nn.GRU
# --------------------------------------------------------------------------------------
class RecurrentClassifier(nn.Module):
    """Two-layer LSTM / GRU (batch first) → last position → Linear."""

    def __init__(self, cell: type[nn.RNNBase], bidirectional: bool):
        super().__init__()
        self.rnn = cell(
            D_IN, 4, num_layers=2, batch_first=True, bidirectional=bidirectional, dtype=DTYPE
        )
        self.head = nn.Linear(8 if bidirectional else 4, N_CLASSES, dtype=DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize(
    ("cell", "bidirectional"),
    [(nn.LSTM, False), (nn.LSTM, True), (nn.GRU, False), (nn.GRU, True)],
    ids=["lstm", "lstm_bidirectional", "gru", "gru_bidirectional"],
)
def test_recurrent_full_and_diag_equal_the_dense_ggn(cell, bidirectional):
    g = generator(31 + 2 * (cell is nn.GRU) + bidirectional)
    model = ref.init_(RecurrentClassifier(cell, bidirectional), g, 0.5).eval()
    x = torch.randn(N_SEQ, T_SEQ, D_IN, generator=g, dtype=DTYPE)
    y = torch.randint(0, N_CLASSES, (N_SEQ,), generator=g)
    names = ref.trainable_names(model)
    J = ref.loop_jacobian(model, names, x)  # vmap cannot batch the fused recurrent kernels
    with torch.no_grad():
        f = torch.cat([model(x[i : i + 1]) for i in range(N_SEQ)])
    check_full_and_diag(model, batches_of(x, y, BATCH), dense_ggn_from(J, f))


# --------------------------------------------------------------------------------------
# 3. tied embedding and output weights; 4. position embeddings broadcast over the batch
# --------------------------------------------------------------------------------------
VOCAB, D_EMB = 7, 3


class TiedLM(nn.Module):
    """Embedding → Linear → tanh → mean → output Linear sharing the embedding's weight,
    a classifier over the vocabulary (as a language model's next-token head)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D_EMB, dtype=DTYPE)
        self.mix = nn.Linear(D_EMB, D_EMB, dtype=DTYPE)
        self.head = nn.Linear(D_EMB, VOCAB, dtype=DTYPE)
        self.head.weight = self.emb.weight  # tied: one Parameter, two modules

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))).mean(1))


class PositionEmbedded(nn.Module):
    """Token embeddings (B, T, d) plus position embeddings (1, T, d) broadcast over B."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D_EMB, dtype=DTYPE)
        self.pos = nn.Embedding(T_SEQ, D_EMB, dtype=DTYPE)
        self.head = nn.Linear(D_EMB, N_CLASSES, dtype=DTYPE)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None]  # (1, T)
        h = self.tok(ids) + self.pos(positions)
        return self.head(torch.tanh(h).mean(1))


def _token_problem(model: nn.Module, seed: int, n_classes: int):
    g = generator(seed)
    ref.init_(model, g, 0.8)
    ids = torch.randint(0, VOCAB, (N_SEQ, T_SEQ), generator=g)
    y = torch.randint(0, n_classes, (N_SEQ,), generator=g)
    names = ref.trainable_names(model)
    J, f = per_datum_jacobian(model, names, rows_of(ids, N_SEQ))
    return batches_of(ids, y, BATCH), names, dense_ggn_from(J, f)


def test_tied_weights():
    model = TiedLM()
    batches, names, G = _token_problem(model, 41, VOCAB)
    assert "head.weight" not in names and model.head.weight is model.emb.weight
    check_full_and_diag(model, batches, G)
    # kron: the tied parameter has no Kronecker form; it gets its exact diagonal block
    kron = fit(model, batches, "kron")
    tied = name_slices(model, names)["emb.weight"]
    check_exact_diagonal_blocks(curvature(kron), G, [tied])


def test_broadcast_position_embeddings():
    """The position table's output has batch dimension 1; its curvature is the sum over the
    data of each datum's own contribution (it was over-counted before)."""
    model = PositionEmbedded()
    batches, _, G = _token_problem(model, 43, N_CLASSES)
    check_full_and_diag(model, batches, G)


# --------------------------------------------------------------------------------------
# 5. mapping batches end to end; outputs as a mapping, a tuple or an object
# --------------------------------------------------------------------------------------
class KwargsNet(nn.Module):
    """``forward(input_ids, attention_mask)``: masked mean of tanh embeddings → Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D_EMB, dtype=DTYPE)
        self.head = nn.Linear(D_EMB, N_CLASSES, dtype=DTYPE)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = torch.tanh(self.emb(input_ids))
        m = attention_mask[..., None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


class DictOut(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, **inputs: Tensor) -> dict[str, Tensor]:
        return {"logits": self.net(**inputs)}


class TupleOut(DictOut):
    def forward(self, **inputs: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        logits = self.net(**inputs)
        return logits, logits.detach() * 0.0 + 1.0  # a second output laplacefim must ignore


class ObjectOut(DictOut):
    def forward(self, **inputs: Tensor) -> SimpleNamespace:  # type: ignore[override]
        return SimpleNamespace(logits=self.net(**inputs), hidden=None)


N_TRAIN, N_VAL = 7, 5
MAPPING_IO = {"y_key": "labels", "call_kwargs": True, "output_key": "logits"}


def _token_inputs(n: int, g: torch.Generator) -> dict[str, Tensor]:
    ids = torch.randint(0, VOCAB, (n, T_SEQ), generator=g)
    mask = torch.ones(n, T_SEQ, dtype=torch.long)
    mask[::2, -1] = 0  # padding on every other row
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def mapping_problem():
    g = generator(51)
    net = ref.init_(KwargsNet(), g, 0.8)
    model = DictOut(net)
    x, x_val = _token_inputs(N_TRAIN, g), _token_inputs(N_VAL, g)
    y = torch.randint(0, N_CLASSES, (N_TRAIN,), generator=g)
    y_val = torch.randint(0, N_CLASSES, (N_VAL,), generator=g)
    names = ref.trainable_names(model)

    def logits(fn, r):
        return fn(**r)["logits"]

    J, f = per_datum_jacobian(model, names, rows_of(x, N_TRAIN), logits)
    J_val, f_val = per_datum_jacobian(model, names, rows_of(x_val, N_VAL), logits)
    return SimpleNamespace(
        net=net,
        model=model,
        x=x,
        y=y,
        x_val=x_val,
        y_val=y_val,
        theta=ref.flat_params(model, names),
        G=dense_ggn_from(J, f),
        f=f,
        J_val=J_val,
        f_val=f_val,
    )


def dense_evidence(p: SimpleNamespace, prior: float) -> float:
    """``log p(D|θ*) − ½ δ‖θ*‖² − ½ (log det(G + δI) − P log δ)``."""
    P = p.theta.numel()
    log_lik = torch.log_softmax(p.f, -1).gather(1, p.y[:, None]).sum()
    logdet = torch.linalg.slogdet(p.G + prior * torch.eye(P, dtype=DTYPE))[1]
    value = log_lik - 0.5 * prior * p.theta @ p.theta - 0.5 * (logdet - P * math.log(prior))
    return float(value)


def dense_prediction(p: SimpleNamespace, prior: float) -> tuple[Tensor, Tensor]:
    """GLM at the validation inputs: ``J Σ Jᵀ`` (B, C, C) and probit probabilities."""
    sigma = torch.linalg.inv(p.G + prior * torch.eye(p.theta.numel(), dtype=DTYPE))
    cov = torch.einsum("ncp,pq,ndq->ncd", p.J_val, sigma, p.J_val)
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    probs = torch.softmax(p.f_val / torch.sqrt(1.0 + math.pi / 8.0 * var), -1)
    return cov, probs


def test_mapping_batches_end_to_end(mapping_problem, tmp_path):
    p = mapping_problem
    train = batches_of(p.x, p.y, BATCH, y_key="labels")
    la = fit(p.model, train, "full", **MAPPING_IO)
    assert_close(curvature(la), p.G, EXACT_RTOL)

    # the evidence, and the marglik-tuned prior is a stationary point of the dense one
    for prior in (0.3, 2.0):
        assert_close(
            la.log_marginal_likelihood(prior), torch.tensor(dense_evidence(p, prior)), DENSE_RTOL
        )
    tuned = float(la.tune_prior().prior_precision)
    slope = (
        dense_evidence(p, tuned * math.exp(FD_STEP)) - dense_evidence(p, tuned * math.exp(-FD_STEP))
    ) / (2 * FD_STEP)
    assert abs(slope) <= STATIONARY_RTOL * p.theta.numel(), (tuned, slope)

    # gridsearch on a mapping val_loader picks the dense oracle's best grid point
    grid = torch.logspace(-2, 2, 9, dtype=DTYPE)
    scores = []
    for prior in grid.tolist():
        probs = dense_prediction(p, prior)[1]
        scores.append(float(-probs.gather(1, p.y_val[:, None]).log().sum()))
    order = sorted(range(len(scores)), key=scores.__getitem__)
    assert scores[order[1]] - scores[order[0]] > GRID_MARGIN * abs(scores[order[0]])
    val = batches_of(p.x_val, p.y_val, N_VAL, y_key="labels")
    la.tune_prior(method="gridsearch", val_loader=val, grid=grid)
    best = float(grid[order[0]])
    assert float(la.prior_precision) == best

    # predictions on mapping inputs: the GLM's J Σ Jᵀ and probit probabilities
    cov, probs = dense_prediction(p, best)
    pred = la.predict(p.x_val, joint_outputs=True)
    assert_close(pred.logit_cov, cov, DENSE_RTOL)
    assert_close(pred.probs, probs, DENSE_RTOL)

    # the same with the inputs under x_key, the mapping passed as model(**inputs)
    nested = [
        {"inputs": {k: v for k, v in b.items() if k != "labels"}, "labels": b["labels"]}
        for b in train
    ]
    la_x = fit(p.model, nested, "full", x_key="inputs", prior_precision=best, **MAPPING_IO)
    assert_close(curvature(la_x), p.G, EXACT_RTOL)
    pred_x = la_x.predict(p.x_val, joint_outputs=True)
    assert_close(pred_x.logit_cov, cov, DENSE_RTOL)
    assert_close(pred_x.probs, probs, DENSE_RTOL)

    # function samples are f + J (θ − θ*) for the weight samples of the same generator
    n_samples = 3
    samples = la.predictive_samples(p.x_val, n_samples, generator=generator(5))
    deltas = la.sample(n_samples, generator=generator(5)) - p.theta
    expected = p.f_val + torch.einsum("ncp,sp->snc", p.J_val, deltas)
    assert samples.shape == (n_samples, N_VAL, N_CLASSES)
    assert_close(samples, expected, EXACT_RTOL)

    # save / load round trip: identical predictions
    path = tmp_path / "la.pt"
    la.save(path)
    loaded = Laplace.load(path, p.model, **MAPPING_IO)
    assert float(loaded.prior_precision) == best
    again = loaded.predict(p.x_val, joint_outputs=True)
    assert torch.equal(again.probs, pred.probs)
    assert torch.equal(again.logit_cov, pred.logit_cov)


@pytest.mark.parametrize("wrapper", ["tuple", "object"])
def test_tuple_and_object_outputs(mapping_problem, wrapper):
    """The same network returning a tuple (``output_key=0``) or an object with ``.logits``
    (``output_fn``): the same curvature and predictions as the mapping one."""
    p = mapping_problem
    if wrapper == "tuple":
        model, io = TupleOut(p.net), {"output_key": 0}
    else:
        model, io = ObjectOut(p.net), {"output_fn": lambda out: out.logits}
    train = batches_of(p.x, p.y, BATCH, y_key="labels")
    la = fit(model, train, "full", y_key="labels", call_kwargs=True, **io)
    assert_close(curvature(la), p.G, EXACT_RTOL)
    cov, probs = dense_prediction(p, 1.0)
    pred = la.predict(p.x_val, joint_outputs=True)
    assert_close(pred.logit_cov, cov, DENSE_RTOL)
    assert_close(pred.probs, probs, DENSE_RTOL)


# --------------------------------------------------------------------------------------
# 6. HuggingFace BERT and GPT-2 from small configs; 7. LoRA adapters (peft)
# --------------------------------------------------------------------------------------
HF_VOCAB, HF_T, HF_N, HF_BATCH = 30, 5, 6, 4
HF_IO = {"y_key": "labels", "call_kwargs": True, "output_key": "logits"}


def _bert(transformers):
    config = transformers.BertConfig(
        vocab_size=HF_VOCAB,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config).double().eval()


def _gpt2(transformers):
    config = transformers.GPT2Config(
        vocab_size=HF_VOCAB,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_positions=16,
        num_labels=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2ForSequenceClassification(config).double().eval()


def _hf_problem(model: nn.Module, seed: int):
    """Mapping batches (input_ids, attention_mask, labels) and the dense GGN of the
    trainable parameters, the model run as ``model(**inputs).logits``."""
    g = generator(seed)
    ids = torch.randint(2, HF_VOCAB, (HF_N, HF_T), generator=g)  # no pad / eos token
    mask = torch.ones(HF_N, HF_T, dtype=torch.long)
    mask[0, -2:] = 0
    mask[3, -1:] = 0
    y = torch.randint(0, 2, (HF_N,), generator=g)
    inputs = {"input_ids": ids, "attention_mask": mask}
    names = ref.trainable_names(model)
    J, f = per_datum_jacobian(model, names, rows_of(inputs, HF_N), lambda fn, r: fn(**r).logits)
    return batches_of(inputs, y, HF_BATCH, y_key="labels"), names, dense_ggn_from(J, f)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_huggingface_models(arch):
    transformers = pytest.importorskip("transformers")
    g = generator(61 + (arch == "gpt2"))
    model = ref.init_(_bert(transformers) if arch == "bert" else _gpt2(transformers), g, 0.3)
    batches, names, G = _hf_problem(model, 63)
    assert names == ref.trainable_names(model)
    # entries compared on the scale of max|G| (a key bias has an exact gradient of 0)
    check_full_and_diag(model, batches, G, **HF_IO)
    kron = fit(model, batches, "kron", **HF_IO)
    assert curvature(kron).shape == G.shape
    kinds = {block.names: type(block).__name__ for block in kron.curvature.blocks}
    if arch == "gpt2":
        # HuggingFace's Conv1D (x @ W + b, W (d_in, d_out)) weights are Kronecker blocks
        conv1d = transformers.pytorch_utils.Conv1D
        weights = [f"{p}.weight" for p, m in model.named_modules() if isinstance(m, conv1d)]
        assert len(weights) == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
        for name in weights:
            assert kinds[(name,)] == "KronBlock", (name, kinds.get((name,)))
    else:
        assert kinds[("bert.encoder.layer.0.attention.self.query.weight",)] == "KronBlock"


def test_lora_adapters():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    g = generator(71)
    base = ref.init_(_bert(transformers), g, 0.3)
    config = peft.LoraConfig(r=2, target_modules=["query", "value"], lora_alpha=4, lora_dropout=0.0)
    model = peft.get_peft_model(base, config).eval()
    names = ref.trainable_names(model)
    lora = [n for n in names if ".lora_A." in n or ".lora_B." in n]
    assert len(lora) == 4 and set(lora) == set(names)  # only the adapters are trainable
    with torch.no_grad():  # lora_B starts at 0, which would zero the gradients of lora_A
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(0.5 * torch.randn(param.shape, generator=g, dtype=param.dtype))
    batches, _, G = _hf_problem(model, 73)
    assert G.shape[0] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    full = fit(model, batches, "full", **HF_IO)
    assert_close(curvature(full), G, EXACT_RTOL)
    kron = fit(model, batches, "kron", **HF_IO)
    kinds = {block.names: type(block).__name__ for block in kron.curvature.blocks}
    assert set(kinds) == {(n,) for n in lora}
    assert set(kinds.values()) == {"KronBlock"}


# --------------------------------------------------------------------------------------
# 8. refusals: parameters the engine cannot account for exactly
# --------------------------------------------------------------------------------------
class Borrower(nn.Module):
    """``other`` is a Linear; with ``borrow`` its weight is used functionally instead."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(D_IN, 4, dtype=DTYPE)
        self.other = nn.Linear(4, 4, bias=False, dtype=DTYPE)
        self.head = nn.Linear(4, N_CLASSES, dtype=DTYPE)
        self.borrow = False

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x))
        h = F.linear(h, self.other.weight) if self.borrow else self.other(h)
        return self.head(torch.tanh(h).mean(1))


class SequenceFirst(nn.Module):
    """With ``seq_first``, ``proj`` (a plain Linear) sees (T, B, d) inputs."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D_IN, 4, dtype=DTYPE)
        self.head = nn.Linear(4, N_CLASSES, dtype=DTYPE)
        self.seq_first = False

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x.transpose(0, 1)).transpose(0, 1) if self.seq_first else self.proj(x)
        return self.head(torch.tanh(h).mean(1))


class FrequencyScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D_EMB, dtype=DTYPE)
        self.head = nn.Linear(D_EMB, N_CLASSES, dtype=DTYPE)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(ids)).mean(1))


def _same_state(a: object, b: object) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple):
        return (
            isinstance(b, list | tuple)
            and len(a) == len(b)
            and all(_same_state(u, v) for u, v in zip(a, b, strict=True))
        )
    return a == b


def _set_broken(model: nn.Module, case: str, broken: bool) -> None:
    if case == "functional":
        model.borrow = broken
    elif case == "sequence_first":
        model.seq_first = broken
    else:
        model.emb.scale_grad_by_freq = broken


REFUSALS = {
    # case: (model class, the name the message must quote). The audit names parameters;
    # the Embedding rule refuses scale_grad_by_freq up front and names the module ('emb',
    # whose only parameter is emb.weight).
    "functional": (Borrower, "'other.weight'"),
    "sequence_first": (SequenceFirst, "'proj.weight'"),
    "scale_grad_by_freq": (FrequencyScaled, "'emb'"),
}
# Rows of the batch = sequence length = the audit's probe rows (PROBE_ROWS in
# laplacefim/curvature/audit.py): a (T, B, d) tensor then has the shape of a (B, T, d) one
# in the fit and in the audit's probe, so no shape check can tell, only the audit's
# cotangent-on-one-datum check.
N_REFUSE = 3


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_parameter_and_keep_the_fit(case):
    """A fit that must be refused raises a ValueError naming the parameter, and leaves the
    Laplace exactly as its previous (valid) fit left it."""
    cls, quoted = REFUSALS[case]
    g = generator(81 + list(REFUSALS).index(case))
    model = ref.init_(cls(), g, 0.8)
    if case == "scale_grad_by_freq":
        x = torch.randint(0, VOCAB, (N_REFUSE, N_REFUSE), generator=g)
        x[0, 1] = x[1, 2] = x[0, 0]  # a repeated token: the frequency scaling matters
    else:
        x = torch.randn(N_REFUSE, N_REFUSE, D_IN, generator=g, dtype=DTYPE)
    y = torch.randint(0, N_CLASSES, (N_REFUSE,), generator=g)
    batches = batches_of(x, y, N_REFUSE)
    for structure in ("full", "kron"):
        la = fit(model, batches, structure)  # the valid model first
        before = copy.deepcopy(la.state_dict())
        dense = curvature(la)
        _set_broken(model, case, True)
        try:
            with pytest.raises(ValueError) as info:
                la.fit(batches)
        finally:
            _set_broken(model, case, False)
        message = str(info.value)
        assert quoted in message, message
        assert _same_state(la.state_dict(), before), message
        assert torch.equal(curvature(la), dense)
