"""Nearest tokens across the dataset, in the hidden space itself.

VL-InterpreT looked up "nearest tokens" in independent per-example t-SNE maps, which
compares unrelated coordinates. Here distances are Euclidean distances between hidden
states at one layer, found exactly (a fast float32 pass, then float64 re-ranking). Pure
functions: ``ds.vli.nearest_tokens`` keeps a layer whose real tokens fit in
``DEFAULT_MEMORY_BUDGET`` bytes in memory after its first read (dashboard clicks are then one
search) and passes it as ``layer``; a larger layer is copied once into a contiguous matrix
cached beside the store and searched block by block, keeping the best candidates.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from vlinterpret_panel import cache
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.projection import check_hidden_layer, hidden_vectors, real_tokens
from vlinterpret_panel.schema import IMAGE, PAD, SPECIAL, TEXT

COLUMNS = ("example", "token", "token_text", "modality", "text", "distance")
DEFAULT_MEMORY_BUDGET = 512 * 2**20
CACHE_KIND = "neighbors-layer"
_RERANK_MARGIN = 32


def _scan(
    ds: xr.Dataset, hidden_layer: int, example_index: np.ndarray, token: np.ndarray, batch_tokens: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(point positions, vectors)`` of every real token of the layer, read from the store in batches."""
    n_examples = ds.sizes["example"]
    starts = np.searchsorted(example_index, np.arange(n_examples + 1))
    examples_per_batch = max(1, batch_tokens // max(1, ds.sizes["token"]))
    for first in range(0, n_examples, examples_per_batch):
        last = min(n_examples, first + examples_per_batch)
        points = np.arange(starts[first], starts[last])
        yield points, hidden_vectors(ds, hidden_layer, slice(first, last))[example_index[points] - first, token[points]]


def _copy_entry(hidden_layer: int, n_points: int) -> tuple[str, dict]:
    """The cache kind and parameters of a layer's contiguous copy beside the store."""
    return f"{CACHE_KIND}-{hidden_layer}", {"hidden_layer": hidden_layer, "points": n_points}


def fits_in_memory(ds: xr.Dataset, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> bool:
    """Whether one hidden layer's real tokens take at most ``memory_budget`` bytes (float32)."""
    n_points = int(np.sum(ds["modality"].values != PAD))
    return n_points * ds.sizes["feature"] * 4 <= memory_budget


def read_layer(ds: xr.Dataset, hidden_layer: int, *, batch_tokens: int = 50_000) -> np.ndarray:
    """Every real token's hidden vector at ``hidden_layer``, ``(point, feature)`` float32, in ``real_tokens`` order."""
    hidden_layer = check_hidden_layer(ds, hidden_layer)
    example_index, token = real_tokens(ds)
    kept = [vectors for _, vectors in _scan(ds, hidden_layer, example_index, token, batch_tokens)]
    return np.concatenate(kept) if kept else np.empty((0, ds.sizes["feature"]), np.float32)


def _layer_copy(ds: xr.Dataset, hidden_layer: int, batch_tokens: int) -> Path | None:
    """The layer's contiguous float32 copy beside the store, written by one scan on its first use."""
    example_index, token = real_tokens(ds)

    def write(path: Path) -> None:
        matrix = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(token), ds.sizes["feature"]))
        for points, vectors in _scan(ds, hidden_layer, example_index, token, batch_tokens):
            matrix[points] = vectors
        matrix.flush()
        del matrix

    return cache.cached_array(ds.vli.identity, *_copy_entry(hidden_layer, len(token)), write)


def layer_copy_exists(ds: xr.Dataset, hidden_layer: int) -> bool:
    """Whether the layer's copy beside the store exists (a search then reads it, not the store)."""
    hidden_layer = check_hidden_layer(ds, hidden_layer)
    n_points = int(np.sum(ds["modality"].values != PAD))
    path = cache.cache_path(ds.vli.identity, *_copy_entry(hidden_layer, n_points), suffix=".npy")
    return path is not None and path.exists()


def prepare_layer_copy(ds: xr.Dataset, hidden_layer: int, *, batch_tokens: int = 50_000) -> None:
    """Write the layer's copy beside the store now, so the first search does not scan the store."""
    _layer_copy(ds, check_hidden_layer(ds, hidden_layer), batch_tokens)


def _batches(
    ds: xr.Dataset,
    hidden_layer: int,
    example_index: np.ndarray,
    token: np.ndarray,
    batch_tokens: int,
    layer: np.ndarray | None,
    use_cache: bool,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(point positions, vectors)`` covering every real token of the layer, from the fastest source.

    The layer given in memory; else its copy beside the store (written on first use, one
    scan), read block by block; without a cache, a scan of the store.
    """
    if layer is not None:
        if layer.shape != (len(token), ds.sizes["feature"]):
            raise VLIError(f"layer: expected {(len(token), ds.sizes['feature'])} vectors, got {layer.shape}")
        yield np.arange(len(token)), layer
        return
    copy = _layer_copy(ds, hidden_layer, batch_tokens) if use_cache else None
    if copy is None:
        yield from _scan(ds, hidden_layer, example_index, token, batch_tokens)
        return
    for start in range(0, len(token), batch_tokens):
        points = np.arange(start, min(len(token), start + batch_tokens))
        yield points, cache.read_rows(copy, start, points[-1] + 1)


def _block_nearest(query: np.ndarray, vectors: np.ndarray, usable: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the ``k`` usable vectors nearest to ``query`` and their exact distances, nearest first.

    Candidates come from one float32 matrix-vector product (``|x|^2 - 2 x.q``, about 5 times
    faster than scikit-learn's brute-force search, which copies and upcasts the block);
    ``_RERANK_MARGIN`` extra candidates are then re-ranked with float64 differences, so
    rounding in the fast pass cannot change the answer and identical vectors are at 0.
    """
    scores = np.einsum("ij,ij->i", vectors, vectors) - 2 * (vectors @ query)
    scores[~usable] = np.inf
    n_candidates = min(k + _RERANK_MARGIN, int(usable.sum()))
    candidates = np.argpartition(scores, n_candidates - 1)[:n_candidates]
    candidates = candidates[np.isfinite(scores[candidates])]
    exact = np.sqrt(((vectors[candidates].astype(np.float64) - query) ** 2).sum(axis=1))
    order = np.lexsort((candidates, exact))[:k]  # ties (copied tokens) in token order, deterministically
    return candidates[order], exact[order]


def _check_modality(modality: str | Sequence[str] | None) -> set[str] | None:
    if modality is None:
        return None
    wanted = {modality} if isinstance(modality, str) else set(modality)
    unknown = sorted(wanted - {TEXT, IMAGE, SPECIAL})
    if unknown or not wanted:
        raise VLIError(f"modality: expected some of {[TEXT, IMAGE, SPECIAL]}, got {sorted(wanted)}")
    return wanted


def nearest_tokens(
    ds: xr.Dataset,
    example: int | str,
    token: int,
    hidden_layer: int,
    k: int = 10,
    *,
    modality: str | Sequence[str] | None = None,
    batch_tokens: int = 50_000,
    layer: np.ndarray | None = None,
    use_cache: bool = True,
) -> pd.DataFrame:
    """The ``k`` tokens of the dataset nearest to one token's hidden state at ``hidden_layer``.

    ``example`` is an index or id, ``token`` a position in it; ``modality`` (e.g. ``"image"``)
    restricts the candidates. The query token itself is excluded; other tokens at distance 0
    are kept. Returns one row per neighbour, nearest first, with columns ``example`` (id),
    ``token``, ``token_text``, ``modality``, ``text`` (the example's text) and ``distance``.
    ``layer`` is the layer's vectors in memory (``read_layer``), when the caller keeps them;
    otherwise the layer's copy beside the store is searched (``use_cache=False`` never writes
    it: the store is then scanned on every query).
    """
    position = ds.vli.position(example)
    hidden_layer = check_hidden_layer(ds, hidden_layer)
    wanted = _check_modality(modality)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise VLIError(f"k: expected a positive integer, got {k!r}")
    labels = ds["modality"].values
    n_real = int(np.sum(labels[position] != PAD))
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < n_real:
        raise VLIError(f"token: expected a position between 0 and {n_real - 1} in example {example!r}, got {token!r}")

    query = hidden_vectors(ds, hidden_layer, np.array([position]))[0, token][None, :]
    example_index, token_index = real_tokens(ds)
    candidate = ~((example_index == position) & (token_index == token))
    if wanted is not None:
        candidate &= np.isin(labels[example_index, token_index], list(wanted))

    best_points = np.empty(0, dtype=np.int64)
    best_distances = np.empty(0, dtype=np.float64)
    for points, vectors in _batches(ds, hidden_layer, example_index, token_index, batch_tokens, layer, use_cache):
        usable = candidate[points]
        if not usable.any():
            continue
        rows, distances = _block_nearest(query[0], vectors, usable, k)
        best_points = np.concatenate([best_points, points[rows]])
        best_distances = np.concatenate([best_distances, distances])
        order = np.argsort(best_distances, kind="stable")[:k]
        best_points, best_distances = best_points[order], best_distances[order]

    found_examples, found_tokens = example_index[best_points], token_index[best_points]
    return pd.DataFrame(
        {
            "example": ds["example"].values[found_examples].astype(str),
            "token": found_tokens.astype(int),
            "token_text": ds["token_text"].values[found_examples, found_tokens].astype(str),
            "modality": labels[found_examples, found_tokens].astype(str),
            "text": ds["text"].values[found_examples].astype(str),
            "distance": best_distances,
        },
        columns=list(COLUMNS),
    )
