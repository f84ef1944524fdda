"""``nn.LSTM``, ``nn.GRU``, ``nn.RNN``: weights shared over time, unrolled.

Each recurrent weight is a linear map applied at every time step — ``W_ih`` to the
layer's input ``x_t``, ``W_hh`` to the previous hidden state ``h_{t−1}`` (and ``W_hr`` to
an LSTM's unprojected hidden state) — so its per-sample gradient is ``Σ_t g_t a_tᵀ``: a
:class:`~laplacefim.curvature.segments.Product` over the ``T`` steps. The rule replays the
recorded call step by step (the fused kernel keeps no intermediate), checks that it
reproduces the module's outputs, and backpropagates the columns' gradients of the output
sequence and final states to every step's gate pre-activations. Exact diagonals follow,
and KFAC over the unrolled steps (``kfac_approx`` "expand" or "reduce"). Supports any
number of layers, bidirectional layers, ``batch_first`` either way, biases, initial
states, LSTM projections; dropout between layers is off (eval mode). Packed sequences are
refused: pad them and mask the loss instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from laplacefim.curvature.hooks import Call, column_grads
from laplacefim.curvature.segments import Product, Segment, join

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _cell(
    mode: str, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """One step: the new hidden state (before any projection) and cell state."""
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()  # type: ignore[operator]
        return o.sigmoid() * c.tanh(), c
    if mode == "GRU":
        r_i, z_i, n_i = gi.chunk(3, dim=-1)
        r_h, z_h, n_h = gh.chunk(3, dim=-1)
        r, z = (r_i + r_h).sigmoid(), (z_i + z_h).sigmoid()
        n = (n_i + r * n_h).tanh()
        return (1 - z) * n + z * h, None
    pre = gi + gh
    return (pre.tanh() if mode == "RNN_TANH" else pre.relu()), None


class _Replay:
    """The recorded call replayed step by step, with a zero leaf added to every linear
    map's output so that autograd gives the gradients there."""

    def __init__(self, module: nn.RNNBase, call: Call) -> None:
        x = call.arg(0, "input")
        if not isinstance(x, Tensor):
            raise ValueError(
                f"{type(module).__name__} got a {type(x).__name__}; packed sequences are not "
                "supported: pad the sequences and mask the loss instead."
            )
        if x.ndim != 3:
            raise ValueError(
                f"{type(module).__name__} needs batched 3-D inputs, got {tuple(x.shape)}."
            )
        self.module = module
        self.x = x if module.batch_first else x.transpose(0, 1)
        if self.x.shape[0] != call.batch:
            raise ValueError(
                f"{type(module).__name__}(batch_first={module.batch_first}) got an input of shape "
                f"{tuple(x.shape)} for a batch of {call.batch}."
            )
        self.hx = call.arg(1, "hx")
        self.rows: dict[str, tuple[Tensor | None, Tensor]] = {}  # name -> (inputs, leaf)

    def _initial(self, index: int, batch: int) -> tuple[Tensor, Tensor | None]:
        m = self.module
        h_size = m.proj_size if getattr(m, "proj_size", 0) else m.hidden_size
        zeros = self.x.new_zeros(batch, h_size)
        if self.hx is None:
            cell = self.x.new_zeros(batch, m.hidden_size) if m.mode == "LSTM" else None
            return zeros, cell
        if m.mode == "LSTM":
            h0, c0 = self.hx
            return h0[index], c0[index]
        return self.hx[index], None

    def _leaf(self, name: str, inputs: Tensor | None, shape: tuple[int, ...]) -> Tensor:
        leaf = self.x.new_zeros(shape).requires_grad_()
        self.rows[name] = (None if inputs is None else inputs.detach(), leaf)
        return leaf

    def run(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """Output sequence ``(B, T, D·H)``, final hidden and cell states ``(L·D, B, H)``."""
        m = self.module
        mode, directions = m.mode, 2 if m.bidirectional else 1
        batch, steps = self.x.shape[:2]
        layer_input = self.x
        finals_h, finals_c = [], []
        for layer in range(m.num_layers):
            outputs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                seq = layer_input.flip(1) if direction else layer_input
                w_ih = getattr(m, f"weight_ih{suffix}").detach()
                w_hh = getattr(m, f"weight_hh{suffix}").detach()
                b_ih = getattr(m, f"bias_ih{suffix}").detach() if m.bias else None
                b_hh = getattr(m, f"bias_hh{suffix}").detach() if m.bias else None
                width = w_ih.shape[0]
                gi = F.linear(seq, w_ih, b_ih) + self._leaf(
                    f"ih{suffix}", seq, (batch, steps, width)
                )
                h, c = self._initial(layer * directions + direction, batch)
                previous, raw_states, states = [], [], []
                delta_h = self._leaf(f"hh{suffix}", None, (batch, steps, width))
                w_hr = (
                    getattr(m, f"weight_hr{suffix}").detach()
                    if getattr(m, "proj_size", 0)
                    else None
                )
                delta_r = (
                    self._leaf(f"hr{suffix}", None, (batch, steps, w_hr.shape[0]))
                    if w_hr is not None
                    else None
                )
                for t in range(steps):
                    previous.append(h)
                    gh = F.linear(h, w_hh, b_hh) + delta_h[:, t]
                    raw, c = _cell(mode, gi[:, t], gh, h, c)
                    raw_states.append(raw)
                    h = raw if w_hr is None else F.linear(raw, w_hr) + delta_r[:, t]  # type: ignore[index]
                    states.append(h)
                self.rows[f"hh{suffix}"] = (torch.stack(previous, 1).detach(), delta_h)
                if delta_r is not None:
                    self.rows[f"hr{suffix}"] = (torch.stack(raw_states, 1).detach(), delta_r)
                out = torch.stack(states, 1)
                outputs.append(out.flip(1) if direction else out)
                finals_h.append(h)
                finals_c.append(c)
            layer_input = torch.cat(outputs, -1)
        cells = torch.stack(finals_c) if mode == "LSTM" else None  # type: ignore[arg-type]
        return layer_input, torch.stack(finals_h), cells


def recurrent_rows(
    module: nn.Module, calls: list[Call], wanted: frozenset[str]
) -> dict[str, list[Segment]]:
    """Segments of the wanted recurrent weights and biases, unrolled over time steps."""
    rnn: nn.RNNBase = module  # type: ignore[assignment]
    if rnn.mode not in GATES:
        raise ValueError(f"recurrent mode {rnn.mode!r} is not supported.")
    per_call: list[dict[str, tuple[Tensor | None, Tensor]]] = []
    for call in calls:
        replay = _Replay(rnn, call)
        with torch.enable_grad():
            output, hidden, cell = replay.run()
            recorded = [call.outputs[0] if rnn.batch_first else call.outputs[0].transpose(0, 1)]
            cotangents = [call.grads[0] if rnn.batch_first else call.grads[0].transpose(1, 2)]
            produced = [output, hidden] + ([cell] if cell is not None else [])
            recorded += call.outputs[1:]
            cotangents += call.grads[1:]
            for mine, theirs in zip(produced, recorded, strict=True):
                theirs = theirs.detach()
                scale = float(theirs.abs().max().clamp_min(1e-30))
                tolerance = 1e-6 if theirs.dtype == torch.float64 else 1e-3
                if float((mine.detach() - theirs).abs().max()) > tolerance * scale:
                    raise ValueError(
                        f"the recurrent rule does not reproduce this {type(rnn).__name__} call "
                        "(an option it does not cover); leave its parameters out of the subset."
                    )
            leaves = [leaf for _, leaf in replay.rows.values()]
            grads = column_grads(produced, leaves, cotangents)
        n_columns = cotangents[0].shape[0]
        per_call.append(
            {
                name: (inputs, g if g is not None else leaf.new_zeros(n_columns, *leaf.shape))
                for (name, (inputs, leaf)), g in zip(replay.rows.items(), grads, strict=True)
            }
        )
    found: dict[str, tuple[Tensor | None, Tensor, dict[object, Tensor]]] = {}
    for key in per_call[0]:
        parts = [rows[key] for rows in per_call]
        first_inputs = parts[0][0]
        inputs = None if first_inputs is None else join([p[0] for p in parts], 1)  # type: ignore[misc]
        found[key] = (inputs, join([p[1] for p in parts], 2), {})
    out: dict[str, list[Segment]] = {}
    for name in wanted:
        kind, _, key = name.partition("_")  # weight_ih_l0 -> weight, ih_l0
        inputs, gradients, shared = found[key]
        out[name] = [Product(inputs if kind == "weight" else None, gradients, False, shared)]
    return out
