"""Layer rules, by module type (or by behaviour): how a module's parameters enter the loss.

A rule is one function with one signature, ``rows(module, calls, wanted)``: given the
calls the hooks recorded for a module (its inputs, outputs and the gradients of the
backpropagated columns w.r.t. those outputs), it returns, for each wanted parameter (by
name relative to the module), the per-sample gradients as segments
(:mod:`laplacefim.curvature.segments`). ``claims`` says which parameters it accounts for
(the module's own by default; a rule may claim those of submodules it calls
functionally, as attention does with ``out_proj``).

Add a rule with one line: ``RULES.register(MyModule, LayerRule(my_rows))``. Parameters
that no registered rule claims are handled by :data:`GENERIC` (per-sample gradients of
their own module with ``torch.func``). Whatever the rule, the engine's audit checks on the
first batch of a fit that the rule's gradients are exact.
"""

from __future__ import annotations

from torch import nn

from laplacefim.curvature.rules.attention import attention_claims, attention_rows
from laplacefim.curvature.rules.base import LayerRule, RuleRegistry, own_parameters
from laplacefim.curvature.rules.embedding import embedding_rows
from laplacefim.curvature.rules.generic import generic_rows
from laplacefim.curvature.rules.linear import (
    conv2d_rows,
    is_transposed_linear,
    linear_rows,
    output_product_rows,
    transposed_linear_rows,
    transposed_output_rows,
)
from laplacefim.curvature.rules.norm import norm_rows
from laplacefim.curvature.rules.recurrent import recurrent_rows

GENERIC = LayerRule(generic_rows)
RULES = RuleRegistry()
RULES.register(nn.Linear, LayerRule(linear_rows, output_rows=output_product_rows))
RULES.register(nn.Conv2d, LayerRule(conv2d_rows))
RULES.register(nn.Embedding, LayerRule(embedding_rows))
RULES.register(nn.MultiheadAttention, LayerRule(attention_rows, attention_claims, broadcast=False))
RULES.register(nn.RNNBase, LayerRule(recurrent_rows, broadcast=False))
for norm in (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm):
    RULES.register(norm, LayerRule(norm_rows))
RULES.register_behaviour(
    is_transposed_linear,
    LayerRule(transposed_linear_rows, output_rows=transposed_output_rows),
)

__all__ = ["GENERIC", "RULES", "LayerRule", "RuleRegistry", "own_parameters"]
