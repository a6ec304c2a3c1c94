"""Shared pieces of the relevancy methods: head means, normalisations, layer selection, read-out."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.relevancy.inputs import SELF_KINDS, Captured
from vlinterpret_panel.relevancy.result import Relevancy


def block_mask(captured: Captured, layer: int) -> np.ndarray:
    """``(n, n)`` bool: the (query, key) block a module fills in the full frame."""
    queries, keys = captured.block(layer)
    return queries[:, None] & keys[None, :]


def head_maps(captured: Captured, values: np.ndarray, layer: int) -> np.ndarray:
    """``(real heads, n, n)`` of one layer of a full-frame array, cut to its module's block."""
    maps = captured.real(values)[layer][captured.head_mask[layer]].astype(np.float64)
    return np.where(block_mask(captured, layer), maps, 0.0)


def mean_attention(captured: Captured, layer: int) -> np.ndarray:
    """E_h[A]: the head-mean attention of one module over its real heads."""
    return head_maps(captured, captured.attention, layer).mean(axis=0)


def weighted_attention(captured: Captured, layer: int, weights: np.ndarray) -> np.ndarray:
    """Ā = E_h[(∇A ⊙ W)⁺], clamped per head *before* the head mean (W = A, or LRP relevance)."""
    gradient = head_maps(captured, captured.require("attention_gradient", "a gradient-weighted method"), layer)
    product = gradient * head_maps(captured, weights, layer)
    return np.clip(product, 0.0, None).mean(axis=0)


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Divide each row by its sum; rows summing to 0 stay 0 instead of becoming NaN."""
    sums = matrix.sum(axis=-1, keepdims=True)
    safe = np.where(sums == 0, 1.0, sums)
    return np.where(sums == 0, 0.0, matrix / safe)


def normalized_residual(relevance: np.ndarray) -> np.ndarray:
    """R̄ = row-normalised (R − I), + I: a stream's self-relevance without its residual part."""
    eye = np.eye(relevance.shape[0])
    return normalize_rows(relevance - eye) + eye


def self_layers_from(captured: Captured, start_layer: int) -> np.ndarray:
    """Bool per layer: a self-attention module at or after ``start_layer`` of its own stack.

    Each self kind ("self", "text_self", "image_self") is its own stack, counted in execution
    order; a negative ``start_layer`` counts from the end of each stack (-1 = its last layer).
    """
    kinds = np.asarray(captured.layer_kind)
    keep = np.zeros(len(kinds), bool)
    for kind in SELF_KINDS:
        layers = np.flatnonzero(kinds == kind)
        if not len(layers):
            continue
        if not -len(layers) <= start_layer < len(layers):
            raise VLIError(
                f"start_layer={start_layer} is outside the {len(layers)} {kind!r} layers; "
                f"use -{len(layers)}..{len(layers) - 1}"
            )
        keep[layers[start_layer % len(layers) :]] = True
    return keep


def read_out(
    captured: Captured,
    method: str,
    readout: str | None,
    row_for: Callable[[int, np.ndarray], np.ndarray],
    options: Mapping[str, Any],
) -> Relevancy:
    """Assemble a ``Relevancy`` from readout rows: ``row_for(token, columns)`` gives a ``(n,)`` row.

    Each readout token fills its columns from its own row, with its own entry set to 0;
    padded tokens are NaN.
    """
    name, plan = captured.readout_plan(readout)
    values = np.full(len(captured.modality), np.nan)
    real = np.zeros(captured.n_tokens)
    for token, columns in plan:
        row = row_for(token, columns)
        real[columns] = row[columns]
    for token, _ in plan:
        real[token] = 0.0
    values[: captured.n_tokens] = real
    return Relevancy(
        method=method,
        values=values,
        modality=captured.modality,
        target=captured.target,
        readout=name,
        readout_tokens=[token for token, _ in plan],
        options={"readout": name, **options},
    )
