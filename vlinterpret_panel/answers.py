"""Reads of a stored generated answer: its tokens, their alternatives, and generated token k's map.

Pure functions of a schema Dataset (``ds.vli`` caches and delegates to them). A map of
generated token k is one value per token of the example's sequence: the relevancy of a
stored method (``answer_relevancy``) or the attention row of the query that predicted it
(``answer_attention``, one head or the mean of the heads), as docs/schema.md reads it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import IMAGE

ATTENTION = "attention"
"""The map name of the predicting query's attention row (a layer and a head, or the head mean)."""

ANSWER_COLUMNS = ("step", "token", "probability", "position")
ALTERNATIVE_COLUMNS = ("rank", "token", "probability")


def has_answers(ds: xr.Dataset) -> bool:
    """Whether the store holds generated answers (``--generate``)."""
    return "answer_token" in ds and "answer_position" in ds


def answer_methods(ds: xr.Dataset) -> list[str]:
    """The relevancy methods stored for generated tokens (empty when none are)."""
    if "answer_relevancy" not in ds:
        return []
    return [str(method) for method in ds.indexes["relevancy_method"]]


def _require_answers(ds: xr.Dataset) -> None:
    if not has_answers(ds):
        raise VLIError("this store has no generated answers: extract with --generate to store them")


def answer_table(ds: xr.Dataset, position: int) -> pd.DataFrame:
    """The generated tokens of the example at ``position``: step, token, probability, sequence position.

    Only the generated steps (padding past the answer, ``answer_position == -1``, is dropped).
    """
    _require_answers(ds)
    one = ds[[name for name in ("answer_token", "answer_position", "answer_probability") if name in ds]]
    one = one.isel(example=position).compute()
    positions = np.asarray(one["answer_position"].values, dtype=np.int64)
    steps = np.flatnonzero(positions >= 0)
    probabilities = (
        np.asarray(one["answer_probability"].values, dtype=np.float64)[steps]
        if "answer_probability" in one
        else np.full(len(steps), np.nan)
    )
    return pd.DataFrame(
        {
            "step": steps,
            "token": [str(token) for token in np.asarray(one["answer_token"].values)[steps]],
            "probability": probabilities,
            "position": positions[steps],
        },
        columns=list(ANSWER_COLUMNS),
    )


def alternatives(ds: xr.Dataset, position: int, step: int) -> pd.DataFrame:
    """The top-k tokens the model could have generated at ``step``, most probable first (empty if not stored)."""
    _require_answers(ds)
    if "answer_alternative" not in ds:
        return pd.DataFrame(columns=list(ALTERNATIVE_COLUMNS))
    where = {"example": position, "step": step}
    tokens = np.asarray(ds["answer_alternative"].isel(where).values)
    probabilities = np.asarray(ds["answer_alternative_probability"].isel(where).values, dtype=np.float64)
    named = np.array([str(token) != "" for token in tokens], dtype=bool)
    kept = np.flatnonzero(named & np.isfinite(probabilities))
    return pd.DataFrame(
        {"rank": kept + 1, "token": [str(tokens[i]) for i in kept], "probability": probabilities[kept]},
        columns=list(ALTERNATIVE_COLUMNS),
    )


def answer_map(
    ds: xr.Dataset,
    position: int,
    n_tokens: int,
    step: int,
    method: str = ATTENTION,
    layer: int = -1,
    head: int | None = None,
) -> np.ndarray:
    """Generated token ``step``'s map over the example's ``n_tokens`` real tokens.

    ``method`` names a stored answer relevancy method, or ``ATTENTION`` for the attention row
    of the query that predicted the token at ``layer`` (a position on the layer axis; -1 is
    the last stored) and ``head`` (a position on the head axis; None for the mean of the heads).
    Keys after the predicting query are 0 (causal).
    """
    return _maps(ds, position, n_tokens, step, method, layer, head)


def answer_maps(
    ds: xr.Dataset, position: int, n_tokens: int, method: str = ATTENTION, layer: int = -1, head: int | None = None
) -> np.ndarray:
    """Every generated step's map of the example at ``position``, ``[steps, n_tokens]``, in one read."""
    return _maps(ds, position, n_tokens, slice(None), method, layer, head)


def _maps(
    ds: xr.Dataset, position: int, n_tokens: int, step: int | slice, method: str, layer: int, head: int | None
) -> np.ndarray:
    _require_answers(ds)
    if method == ATTENTION:
        if "answer_attention" not in ds:
            raise VLIError("this store has no answer attention rows (answer_attention)")
        rows = ds["answer_attention"].isel(example=position, step=step, layer=layer)
        values = rows.mean("head") if head is None else rows.isel(head=head)
        return np.nan_to_num(np.asarray(values.values, dtype=np.float64)[..., :n_tokens])
    methods = answer_methods(ds)
    if method not in methods:
        stored = ", ".join(methods) or "none"
        raise VLIError(f"answer relevancy method {method!r} is not in this store (stored: {stored})")
    values = ds["answer_relevancy"].isel(example=position, step=step, relevancy_method=methods.index(method))
    return np.nan_to_num(np.asarray(values.values, dtype=np.float64)[..., :n_tokens])


RELIANCE_PARTS = ("image", "prompt", "answer")


def reliance(maps: np.ndarray, modality: np.ndarray, answer_start: int) -> pd.DataFrame:
    """Share of each generated token's map on the image, the prompt and the answer so far.

    ``maps`` ``[steps, tokens]`` (one map per generated token, ``answer_map``), ``modality``
    per token, ``answer_start`` the sequence position of the first generated token. Negative
    values count as 0; a map with nothing positive gets NaN shares.
    """
    positive = np.clip(np.nan_to_num(np.asarray(maps, dtype=np.float64)), 0, None)
    tokens = np.arange(positive.shape[1])
    image = np.asarray(modality)[: positive.shape[1]] == IMAGE
    parts = {
        "image": image,
        "prompt": ~image & (tokens < answer_start),
        "answer": ~image & (tokens >= answer_start),
    }
    sums = np.stack([positive[:, where].sum(axis=1) for where in parts.values()], axis=1)
    total = sums.sum(axis=1, keepdims=True)
    shares = np.divide(sums, total, out=np.full_like(sums, np.nan), where=total > 0)
    return pd.DataFrame(shares, columns=list(RELIANCE_PARTS)).rename_axis("step")


def dataset_reliance(ds: xr.Dataset, method: str = ATTENTION, layer: int = -1, head: int | None = None) -> xr.DataArray:
    """``reliance`` of every generated token of every example: ``(example, step, part)``, NaN past each answer.

    One vectorised read of the method's maps (``answer_relevancy`` of one method, or the
    ``answer_attention`` rows of one layer, one head or the head mean).
    """
    _require_answers(ds)
    if method == ATTENTION:
        if "answer_attention" not in ds:
            raise VLIError("this store has no answer attention rows (answer_attention)")
        rows = ds["answer_attention"].isel(layer=layer)
        maps = rows.mean("head") if head is None else rows.isel(head=head)
        maps = maps.rename(key="token")
    else:
        methods = answer_methods(ds)
        if method not in methods:
            stored = ", ".join(methods) or "none"
            raise VLIError(f"answer relevancy method {method!r} is not in this store (stored: {stored})")
        maps = ds["answer_relevancy"].isel(relevancy_method=methods.index(method), drop=True)
    positive = maps.fillna(0).clip(min=0).compute()
    positions = ds["answer_position"].compute()
    token = xr.DataArray(np.arange(positive.sizes["token"]), dims="token")
    image = (ds["modality"] == IMAGE).compute()
    start = positions.isel(step=0)
    parts = {
        "image": image,
        "prompt": ~image & (token < start),
        "answer": ~image & (token >= start),
    }
    sums = xr.concat([positive.where(where, 0).sum("token") for where in parts.values()], dim="part")
    sums = sums.assign_coords(part=list(parts))
    total = sums.sum("part")
    shares = (sums / total.where(total > 0)).where(positions >= 0)
    return shares.transpose("example", "step", "part").drop_vars(
        [name for name in shares.coords if name not in ("example", "step", "part")]
    )
