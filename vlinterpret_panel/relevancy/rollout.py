"""Attention rollout (Abnar & Zuidema 2020): attention plus identity, multiplied over layers."""

from __future__ import annotations

import numpy as np

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.relevancy.common import mean_attention, normalize_rows, read_out, self_layers_from
from vlinterpret_panel.relevancy.inputs import CROSS_KINDS, Captured
from vlinterpret_panel.relevancy.registry import ATTENTION, register
from vlinterpret_panel.relevancy.result import Relevancy


def rollout_product(captured: Captured, layers: np.ndarray, renormalize: bool) -> np.ndarray:
    """J = M_L ··· M_first over the selected layers, M_l = E_h[A_l] + I (rows renormalised if asked).

    In the full frame a text-only module leaves image rows as identity rows, so one product
    over both streams' layers holds each stream's own rollout in its diagonal block.
    """
    joint = np.eye(captured.n_tokens)
    for layer in np.flatnonzero(layers):
        step = mean_attention(captured, int(layer)) + np.eye(captured.n_tokens)
        if renormalize:
            step = normalize_rows(step)
        joint = step @ joint
    return joint


@register("rollout", needs=[ATTENTION])
def rollout(
    captured: Captured, *, readout: str | None = None, start_layer: int = 0, renormalize: bool = True
) -> Relevancy:
    """Rollout of the self-attention stacks; dual stream joined through the last cross-attention.

    Single stream and dual encoders: read the readout row of J. Dual stream (or decoder
    cross-attention): with L the last cross module the readout token queries and J_before
    the rollout of the self layers before it, the other stream's columns are
    (J_beforeᵀ · E_h[A_L] · J_before)[readout] and the readout stream's columns are J[readout]
    over all its self layers. ``renormalize`` (default True) divides each row of
    E_h[A] + I by its sum, as Abnar & Zuidema do; one of Chefer et al.'s copies omitted it.
    ``start_layer`` is the first layer of each self-attention stack used (negative: from the end).
    """
    kinds = captured.layer_kind
    has_cross = any(kind in CROSS_KINDS for kind in kinds)
    if has_cross and "self" in kinds:
        raise VLIError("rollout needs either a single-stream model ('self' layers) or stream layers, not both")
    selected = self_layers_from(captured, start_layer)
    full = rollout_product(captured, selected, renormalize)

    def row_for(token: int, _columns: np.ndarray) -> np.ndarray:
        crossing = [
            layer for layer, kind in enumerate(kinds) if kind in CROSS_KINDS and captured.block(layer)[0][token]
        ]
        if not crossing:
            return full[token]
        last_cross = crossing[-1]
        before = selected & (np.arange(len(kinds)) < last_cross)
        joint_before = rollout_product(captured, before, renormalize)
        joined = joint_before.T @ mean_attention(captured, last_cross) @ joint_before
        return full[token] + joined[token]

    return read_out(captured, "rollout", readout, row_for, {"start_layer": start_layer, "renormalize": renormalize})
