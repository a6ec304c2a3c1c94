"""Head statistics for every (example, layer, head), and their summaries across a dataset.

Every statistic is computed from one ``(example, layer)`` attention chunk at a time, with
Dask, so a store larger than memory is summarised in bounded memory. Token roles come
from the ``modality`` labels (never a text length), padded tokens and padded heads drop out.

Block statistics read query → key, like every name in this package: ``text_to_image`` is
how much *text queries* attend to *image keys*. VL-InterpreT names that same block
"image-to-text". For a query ``q`` of a layer (a real token whose attention row is not all
zero in that layer), its *mass* on a set of keys is ``sum_k A[q, k]`` over those keys; a
block statistic ``X_to_Y`` is the mean, over the layer's queries of modality X, of their
mass on keys of modality Y. Special tokens (``modality == "special"``) are neither queries
nor keys of any block, as in VL-InterpreT. A head with no query of modality X gets NaN.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal, cast

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph
from tqdm.auto import tqdm

from vlinterpret_panel import cache
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import IMAGE, SPECIAL, TEXT, require_full_attention

STATISTICS: dict[str, str] = {
    "text_to_image": "mean attention mass text queries put on image keys",
    "image_to_text": "mean attention mass image queries put on text keys",
    "text_to_text": "mean attention mass text queries put on text keys",
    "image_to_image": "mean attention mass image queries put on image keys",
    "image_to_image_no_self": "image_to_image without keys at token distance <= 1 from the query (itself, neighbours)",
    "cross_modal": "mean of text_to_image and image_to_text (whichever exist)",
    "intra_modal": "mean of text_to_text and image_to_image (whichever exist)",
    "to_special": "mean attention mass any query puts on special-token keys",
    "entropy": "mean entropy of the attention rows of all queries (nats)",
    "spatial_distance": "attention-weighted mean distance from an image query to image keys (patch units)",
}
UNITS = {name: "1" for name in STATISTICS} | {"entropy": "nat", "spatial_distance": "patch"}
CUSTOM_PREFIX = "custom:"
CACHE_KIND = "head-statistics"
_CACHE_VERSION = 1

Normalization = Literal["raw", "zscore"]
Aggregate = Literal["mean", "std"]

_TEXT_CODE, _IMAGE_CODE, _SPECIAL_CODE, _PAD_CODE = 0, 1, 2, 3
_ZSCORE_CLIP = 3.0


def available_statistics(ds: xr.Dataset) -> list[str]:
    """Names of every statistic of ``ds``: the built-in ones, then ``custom:<metric>`` ones."""
    names = list(STATISTICS)
    if "custom_metric" in ds:
        names += [f"{CUSTOM_PREFIX}{metric}" for metric in ds["metric"].values.tolist()]
    return names


def _check_statistics(ds: xr.Dataset, statistics: Sequence[str] | None) -> list[str]:
    names = available_statistics(ds)
    if statistics is None:
        return names
    if isinstance(statistics, str):
        statistics = [statistics]
    unknown = [name for name in statistics if name not in names]
    if unknown:
        raise VLIError(f"statistics: unknown {unknown}; choose from {names}")
    return list(statistics)


def modality_codes(modality: np.ndarray) -> np.ndarray:
    """Small integer codes for modality labels (text 0, image 1, special 2, pad 3)."""
    modality = np.asarray(modality)
    return np.select(
        [modality == TEXT, modality == IMAGE, modality == SPECIAL], [_TEXT_CODE, _IMAGE_CODE, _SPECIAL_CODE], _PAD_CODE
    ).astype(np.int8)


def patch_coordinates(ds: xr.Dataset) -> xr.DataArray:
    """(row, column) of every image token in patch units, NaN for other tokens; dims (example, token, grid_axis).

    Uses ``patch_position`` when stored. Otherwise each image token's box centre is divided
    by the median box size of its example, which gives the same patch units on a regular
    grid and a comparable scale for region features.
    """
    modality = ds["modality"].values
    is_image = modality == IMAGE
    if "patch_position" in ds:
        position = ds["patch_position"].values.astype(np.float32)
        position[position < 0] = np.nan
    else:
        box = ds["token_box"].values.astype(np.float32)
        centre = np.stack([(box[..., 1] + box[..., 3]) / 2, (box[..., 0] + box[..., 2]) / 2], axis=-1)
        size = np.stack([box[..., 3] - box[..., 1], box[..., 2] - box[..., 0]], axis=-1)
        size = np.where(is_image[..., None], size, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # examples without image tokens
            typical = np.nanmedian(size, axis=1, keepdims=True)
        position = (centre / np.where(typical > 0, typical, np.nan)).astype(np.float32)
    position[~is_image] = np.nan
    return xr.DataArray(
        position, dims=("example", "token", "grid_axis"), coords={"example": ds["example"].values}
    ).assign_coords(grid_axis=["row", "column"])


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over the last axis where ``mask`` holds; NaN where it never holds."""
    count = mask.sum(axis=-1)
    total = np.where(mask, values, 0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _mean_of_available(*values: np.ndarray) -> np.ndarray:
    """Element-wise mean of the arrays, ignoring NaN; NaN where all are NaN."""
    stacked = np.stack(values)
    count = np.isfinite(stacked).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.nansum(stacked, axis=0) / np.maximum(count, 1), np.nan)


_TINY = np.finfo(np.float32).tiny
# The attention one statistics task reads at most (one example's layers together: a ViLT-sized example's 12 layers
# are 20 MB; a LLaVA-sized example's are 1.5 GB, one layer a task).
_TASK_BYTES = 64 * 2**20
# Columns of the key sets one matrix product sums each attention row over: the row's mass on text, image and
# special keys, on image keys with a patch position, and its total (0 for padding and padded heads).
_TEXT_KEYS, _IMAGE_KEYS, _SPECIAL_KEYS, _PATCH_KEYS, _ALL_KEYS = range(5)


def _example_statistics(layers: Sequence[np.ndarray], codes: np.ndarray, position: np.ndarray) -> np.ndarray:
    """All built-in statistics of one example's attention ``layers`` (each ``(head, query, key)``), ``(layer,
    head, statistic)``; ``codes`` is ``(token,)``, ``position`` ``(token, 2)``.

    The example's key sets and patch distances are computed once for all the layers; each layer costs
    five passes over its attention (NaN to 0, one matrix product for every mass, log, two weighted
    sums), and the averages over rows are taken for all layers at once.
    """
    is_text, is_image, is_special = (codes == _TEXT_CODE), (codes == _IMAGE_CODE), (codes == _SPECIAL_CODE)
    has_position = np.isfinite(position).all(axis=-1) & is_image
    key_sets = np.stack([is_text, is_image, is_special, has_position, np.ones_like(is_text)], axis=-1)
    key_sets = key_sets.astype(np.float32)
    filled = np.where(has_position[:, None], position, 0.0).astype(np.float32)
    distance = np.sqrt(((filled[:, None, :] - filled[None, :, :]) ** 2).sum(axis=-1))
    distance *= has_position[:, None] & has_position[None, :]

    masses, near_mass, row_entropy, weighted_distance = [], [], [], []
    image_after = np.append(is_image[1:], False)  # key q+1 of query q is an image token
    image_before = np.insert(is_image[:-1], 0, False)  # key q-1 of query q is an image token
    for attention in layers:
        weights = np.fmax(attention, np.float32(0))  # NaN padding becomes 0 (fmax ignores NaN), in one pass
        masses.append(weights @ key_sets)  # (head, query, 5)
        # Mass an image query puts on image keys at token distance <= 1: itself and its sequence neighbours.
        near = np.diagonal(weights, 0, -2, -1) * is_image
        near[:, :-1] += np.diagonal(weights, 1, -2, -1) * image_after[:-1]
        near[:, 1:] += np.diagonal(weights, -1, -2, -1) * image_before[1:]
        near_mass.append(near)
        # -p log p with 0 log 0 = 0: log of a floor at the smallest float32 keeps it one cheap pass.
        logs = np.maximum(weights, _TINY)
        np.log(logs, out=logs)
        row_entropy.append(-np.einsum("hqk,hqk->hq", weights, logs))
        weighted_distance.append(np.einsum("hqk,qk->hq", weights, distance))
    mass = np.stack(masses)  # (layer, head, query, 5)
    is_query = mass[..., _ALL_KEYS] > 0.5  # real rows of this layer; padding and padded heads are 0
    text_query, image_query = is_query & is_text, is_query & is_image
    text_mass, image_mass, patch_mass = mass[..., _TEXT_KEYS], mass[..., _IMAGE_KEYS], mass[..., _PATCH_KEYS]
    with np.errstate(invalid="ignore", divide="ignore"):
        row_distance = np.stack(weighted_distance) / patch_mass
    spatial_query = is_query & has_position & (patch_mass > 0)

    text_to_image = _masked_mean(image_mass, text_query)
    image_to_text = _masked_mean(text_mass, image_query)
    text_to_text = _masked_mean(text_mass, text_query)
    image_to_image = _masked_mean(image_mass, image_query)
    values = {
        "text_to_image": text_to_image,
        "image_to_text": image_to_text,
        "text_to_text": text_to_text,
        "image_to_image": image_to_image,
        "image_to_image_no_self": _masked_mean(image_mass - np.stack(near_mass), image_query),
        "cross_modal": _mean_of_available(text_to_image, image_to_text),
        "intra_modal": _mean_of_available(text_to_text, image_to_image),
        "to_special": _masked_mean(mass[..., _SPECIAL_KEYS], is_query),
        "entropy": _masked_mean(np.stack(row_entropy), is_query),
        "spatial_distance": _masked_mean(row_distance, spatial_query),
    }
    return np.stack([values[name] for name in STATISTICS], axis=-1).astype(np.float32)


def _chunk_statistics(layer_blocks: Sequence[np.ndarray], codes: np.ndarray, position: np.ndarray) -> np.ndarray:
    """The statistics ``(example, layer, head, statistic)`` of a chunk of examples given as its blocks along
    ``layer`` (each ``(example, layer, head, query, key)``), ``codes`` ``(example, token)`` and ``position``
    ``(example, token, 2)``."""
    examples = []
    for index in range(len(codes)):
        layers = [layer for block in layer_blocks for layer in block[index]]
        examples.append(_example_statistics(layers, codes[index], position[index]))
    return np.stack(examples)


def _statistics_array(attention: da.Array, codes: np.ndarray, position: np.ndarray) -> da.Array:
    """One kernel task per example chunk and group of its layer blocks of at most ``_TASK_BYTES``: key sets
    and distances are made once per task, and the graph has few kernel tasks (xarray's ``apply_ufunc`` made one
    per block, each joining its inputs' core dimensions even when they were one chunk: ~0.4 ms per block)."""
    name = f"head-statistics-{tokenize(attention.name, codes, position)}"
    example_edges = np.cumsum((0, *attention.chunks[0]))
    layer_bytes = max(attention.chunks[0]) * math.prod(attention.shape[2:]) * attention.dtype.itemsize
    layer_groups: list[list[int]] = []  # consecutive layer blocks read by one task
    group_bytes = 0
    for block, layers in enumerate(attention.chunks[1]):
        if not layer_groups or group_bytes + layers * layer_bytes > _TASK_BYTES:
            layer_groups.append([])
            group_bytes = 0
        layer_groups[-1].append(block)
        group_bytes += layers * layer_bytes
    tasks: dict[Any, Any] = {}
    for chunk, (start, stop) in enumerate(itertools.pairwise(example_edges)):
        for group, blocks in enumerate(layer_groups):
            layer_keys = [(attention.name, chunk, block, 0, 0, 0) for block in blocks]
            tasks[(name, chunk, group, 0, 0)] = (_chunk_statistics, layer_keys, codes[start:stop], position[start:stop])
    graph = HighLevelGraph.from_collections(name, tasks, dependencies=[cast(Any, attention)])
    group_layers = tuple(sum(attention.chunks[1][block] for block in blocks) for blocks in layer_groups)
    chunks = (attention.chunks[0], group_layers, (attention.shape[2],), (len(STATISTICS),))
    return da.Array(graph, name, chunks, dtype=np.float32)


def head_statistics(ds: xr.Dataset, *, statistics: Sequence[str] | None = None) -> xr.Dataset:
    """Lazy per-(example, layer, head) statistics: one Dask-backed variable per statistic.

    Built-in statistics are defined in ``STATISTICS`` and the module docstring; custom ones
    (``custom:<metric>``) are the store's ``custom_metric``. Computing the result reads each
    ``(example, layer)`` attention chunk once for all built-in statistics together.
    """
    names = _check_statistics(ds, statistics)
    builtin = [name for name in names if name in STATISTICS]
    result = xr.Dataset(coords={name: ds.coords[name] for name in ("example", "layer", "head")})
    result = result.assign_coords({name: ds.coords[name] for name in ("layer_kind", "layer_name", "layer_heads")})
    if builtin:
        table = statistics_table(ds)
        for name in builtin:
            result[name] = table.sel(statistic=name, drop=True).transpose("example", "layer", "head")
            result[name].attrs = {"long_name": STATISTICS[name], "units": UNITS[name]}
    for name in names:
        if name.startswith(CUSTOM_PREFIX):
            metric = name.removeprefix(CUSTOM_PREFIX)
            result[name] = ds["custom_metric"].sel(metric=metric, drop=True).transpose("example", "layer", "head")
            result[name].attrs = {"long_name": f"custom metric {metric!r}"}
    return result


def statistics_table(ds: xr.Dataset) -> xr.DataArray:
    """Every built-in statistic as one lazy ``(example, layer, head, statistic)`` float32 array.

    One kernel task per example chunk computes all statistics of all its layers at once; computing
    this array (not one variable per statistic, each a selection task per chunk) keeps the task
    count at about one per chunk read, which is what a distributed scheduler pays for.
    """
    require_full_attention(ds, "head statistics")
    attention = ds["attention"].transpose("example", "layer", "head", "query", "key")
    codes = modality_codes(ds["modality"].values)
    position = patch_coordinates(ds).transpose("example", "token", "grid_axis").values
    if isinstance(attention.data, da.Array):
        data = attention.data.rechunk({2: -1, 3: -1, 4: -1})
        values: np.ndarray | da.Array = _statistics_array(data, codes, position)
    else:
        values = _chunk_statistics([np.asarray(attention.data)], codes, position)
    kept = {name: coord for name, coord in attention.coords.items() if set(coord.dims) <= {"example", "layer", "head"}}
    table = xr.DataArray(values, dims=("example", "layer", "head", "statistic"), coords=kept)
    return table.assign_coords(statistic=np.array(list(STATISTICS), dtype=object))


def compute_head_statistics(
    ds: xr.Dataset, *, batch_size: int = 32, progress: bool = False, use_cache: bool = True
) -> xr.Dataset:
    """All built-in statistics for every example, in memory, cached beside the store.

    Computes ``batch_size`` examples at a time so memory stays bounded however large the
    store. The cache holds every example of the store, so summaries of any subset
    (``where``) are read from it without touching attention again.
    """
    if batch_size < 1:
        raise VLIError(f"batch_size must be at least 1, got {batch_size}")

    def compute_all() -> xr.Dataset:
        lazy = statistics_table(ds)
        n_examples = ds.sizes["example"]
        batches = []
        with tqdm(total=n_examples, unit="example", desc="head statistics", disable=not progress) as bar:
            for start in range(0, n_examples, batch_size):
                stop = min(n_examples, start + batch_size)
                batches.append(lazy.isel(example=slice(start, stop)).compute())
                bar.update(stop - start)
        table = xr.concat(batches, dim="example").transpose("statistic", "example", "layer", "head")
        return table.to_dataset(name="head_statistics")

    params = {"version": _CACHE_VERSION}
    stored = cache.cached(ds.vli.identity, CACHE_KIND, params, compute_all, use_cache=use_cache)
    return stored["head_statistics"].to_dataset("statistic")


def cached_head_statistics(ds: xr.Dataset) -> xr.Dataset | None:
    """The cached statistics table of ``ds`` if one exists, without computing anything."""
    stored = cache.load(ds.vli.identity, CACHE_KIND, {"version": _CACHE_VERSION})
    return None if stored is None else stored["head_statistics"].to_dataset("statistic")


def zscore_per_head(summary: xr.DataArray, clip: float = _ZSCORE_CLIP) -> xr.DataArray:
    """Z-score each head across layers and clip to ``±clip``, as VL-InterpreT's head summary does."""
    mean = summary.mean("layer", skipna=True)
    spread = summary.std("layer", skipna=True)
    scored = xr.where(spread > 0, (summary - mean) / spread.where(spread > 0), 0.0)
    return scored.where(summary.notnull()).clip(-clip, clip).transpose(*summary.dims)


def _subset_positions(ds: xr.Dataset, where: xr.DataArray) -> np.ndarray:
    if not isinstance(where, xr.DataArray) or where.dims != ("example",):
        raise VLIError("where: expected a boolean DataArray over 'example' (e.g. ds.correct == 1)")
    mask = where.compute()
    if mask.dtype != bool:
        raise VLIError(f"where: expected booleans, got {mask.dtype}")
    if "example" in mask.coords:
        mask = mask.reindex(example=ds["example"].values, fill_value=False)
    elif mask.sizes["example"] != ds.sizes["example"]:
        raise VLIError(f"where: {mask.sizes['example']} values for {ds.sizes['example']} examples")
    positions = np.flatnonzero(mask.values)
    if not len(positions):
        raise VLIError("where: selects no example")
    return positions


def head_summary(
    ds: xr.Dataset,
    statistic: str,
    *,
    example: int | str | None = None,
    where: xr.DataArray | None = None,
    normalize: Normalization = "raw",
    aggregate: Aggregate = "mean",
) -> xr.DataArray:
    """A ``(layer, head)`` array of one statistic, in memory, for the head-summary heatmap.

    ``example`` (index or id) gives that example's values; otherwise ``aggregate`` (``mean``
    or ``std``, the spread) runs over all examples or those where ``where`` is True. NaN
    values (e.g. padded heads) are skipped. ``normalize="zscore"`` z-scores each head across
    layers and clips to ±3 like VL-InterpreT, and keeps the raw values as coordinate ``raw``
    for hover text. Statistics of a whole store come from the cache (``compute_head_statistics``).
    """
    _check_statistics(ds, [statistic])
    if normalize not in ("raw", "zscore"):
        raise VLIError(f"normalize: expected 'raw' or 'zscore', got {normalize!r}")
    if aggregate not in ("mean", "std"):
        raise VLIError(f"aggregate: expected 'mean' or 'std', got {aggregate!r}")
    if example is not None and where is not None:
        raise VLIError("example and where: give one example or a subset, not both")

    if example is not None:
        position = ds.vli.position(example)
        one = ds.isel(example=[position])
        table = cached_head_statistics(ds) if statistic in STATISTICS else None
        if table is not None:
            values = table[statistic].isel(example=position)
        else:
            values = head_statistics(one, statistics=[statistic])[statistic].isel(example=0).compute()
        summary, n_examples = values, 1
    else:
        positions = np.arange(ds.sizes["example"]) if where is None else _subset_positions(ds, where)
        if statistic in STATISTICS:
            values = compute_head_statistics(ds)[statistic].isel(example=positions)
        else:
            values = head_statistics(ds, statistics=[statistic])[statistic].isel(example=positions).compute()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN padded heads
            summary = values.mean("example") if aggregate == "mean" else values.std("example")
        n_examples = len(positions)

    summary = summary.drop_vars([name for name in ("example",) if name in summary.coords])
    raw = summary
    if normalize == "zscore":
        summary = zscore_per_head(summary)
    summary = summary.transpose("layer", "head").astype(np.float32)
    summary.name = statistic
    summary.attrs = {
        "statistic": statistic,
        "long_name": STATISTICS.get(statistic, f"custom metric {statistic.removeprefix(CUSTOM_PREFIX)!r}"),
        "units": "z-score" if normalize == "zscore" else UNITS.get(statistic, "1"),
        "normalize": normalize,
        "aggregate": "example" if example is not None else aggregate,
        "n_examples": n_examples,
    }
    if example is not None:
        summary.attrs["example"] = ds.vli.example_id(example)
    if normalize == "zscore":
        summary = summary.assign_coords(raw=raw.transpose("layer", "head").astype(np.float32))
    return summary


def layer_means(summary: xr.DataArray) -> xr.DataArray:
    """The per-layer mean over real heads of a head summary (the heatmap's "Mean" column)."""
    return summary.where(summary["head"] < summary["layer_heads"]).mean("head", skipna=True)


__all__ = [
    "STATISTICS",
    "available_statistics",
    "compute_head_statistics",
    "head_statistics",
    "head_summary",
    "layer_means",
    "zscore_per_head",
]
