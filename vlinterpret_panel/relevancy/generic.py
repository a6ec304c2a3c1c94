"""The generic relevancy method of Chefer et al. (arXiv 2103.15679): gradient-weighted attention rules.

One relevancy matrix R over all real tokens (the schema's full frame) starts as I and is
updated module by module in execution order. With Ā = E_h[(∇A ⊙ A)⁺]:

* self-attention (any self kind): R += Ā·R. In the full frame this is R_ss += Ā·R_ss and
  R_sq += Ā·R_sq for the module's stream s, and R += Ā·R over all tokens for a single stream;
* cross-attention s→q: R_sq += R̄_ssᵀ·Ā_sq·R̄_qq and R_ss += Ā_sq·R_qs, where R̄ is R − I
  with rows normalised (rows summing to 0 stay 0), plus I.

Co-attention: a cross module immediately followed by one of the other direction is one
co-attention step; all four updates are computed from R before the step, then applied.
A cross module without such a partner (decoder cross-attention) is a step of its own; as
nothing ever attends from the other stream, R_qs stays 0 and its R_ss update vanishes,
which is the encoder-decoder rule (R_iq = 0). "In the last cross layer only the branch read
by the head is updated" needs no special case: the other branch's updates only change rows
of the other stream, and no later module feeds those rows into the readout row (a later
self-attention of the readout's stream reads only its own rows). A model read at both
streams (``readout="text+image"``) needs those updates, so they are always computed.
"""

from __future__ import annotations

import numpy as np

from vlinterpret_panel.relevancy.common import normalized_residual, read_out, self_layers_from, weighted_attention
from vlinterpret_panel.relevancy.inputs import CROSS_KINDS, Captured
from vlinterpret_panel.relevancy.registry import ATTENTION, GRADIENTS, register
from vlinterpret_panel.relevancy.result import Relevancy


def cross_attention_update(captured: Captured, relevance: np.ndarray, layer: int, weights: np.ndarray) -> np.ndarray:
    """The change to R from one cross module s→q, computed from ``relevance`` (R before the step)."""
    queries, keys = (np.flatnonzero(mask) for mask in captured.block(layer))
    weighted = weighted_attention(captured, layer, weights)[np.ix_(queries, keys)]
    query_residual = normalized_residual(relevance[np.ix_(queries, queries)])
    key_residual = normalized_residual(relevance[np.ix_(keys, keys)])
    update = np.zeros_like(relevance)
    update[np.ix_(queries, keys)] = query_residual.T @ weighted @ key_residual
    update[np.ix_(queries, queries)] = weighted @ relevance[np.ix_(keys, queries)]
    return update


def cross_steps(layer_kind: tuple[str, ...], start: int) -> list[int]:
    """Layers of the cross step starting at ``start``: it and an immediately following other direction."""
    following = start + 1
    pairs = following < len(layer_kind) and layer_kind[following] in CROSS_KINDS
    if pairs and layer_kind[following] != layer_kind[start]:
        return [start, following]
    return [start]


def propagate_relevance(captured: Captured, weights: np.ndarray, start_layer: int = 0) -> np.ndarray:
    """R after every module: self rule for self kinds (from ``start_layer`` of each stack), cross rules otherwise.

    ``weights`` is what multiplies ∇A in Ā: the attention itself (generic method) or the LRP
    relevance of the attention maps (Transformer Attribution).
    """
    kinds = captured.layer_kind
    use_self_layer = self_layers_from(captured, start_layer)
    relevance = np.eye(captured.n_tokens)
    layer = 0
    while layer < len(kinds):
        if kinds[layer] not in CROSS_KINDS:
            if use_self_layer[layer]:
                relevance = relevance + weighted_attention(captured, layer, weights) @ relevance
            layer += 1
            continue
        step = cross_steps(tuple(kinds), layer)
        updates = [cross_attention_update(captured, relevance, module, weights) for module in step]
        relevance = relevance + sum(updates)
        layer += len(step)
    return relevance


@register("generic", needs=[ATTENTION, GRADIENTS])
def generic_relevancy(captured: Captured, *, readout: str | None = None, start_layer: int = 0) -> Relevancy:
    """Chefer et al.'s generic method: R propagated through every module, read at the readout row.

    ``start_layer`` is the first layer of each self-attention stack used (negative: from the
    end); their CLIP notebooks later used -1 (last layer only) because earlier layers spread
    context on some models. Cross modules are always used.
    """
    captured.require("attention_gradient", "generic")
    relevance = propagate_relevance(captured, captured.attention, start_layer)
    return read_out(captured, "generic", readout, lambda token, _: relevance[token], {"start_layer": start_layer})
