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


def map_choices(ds: xr.Dataset) -> list[str]:
    """What a generated token's map can show: its attention row (when stored), then each stored relevancy method."""
    return ([ATTENTION] if "answer_attention" in ds else []) + answer_methods(ds)


def output_map_choices(ds: xr.Dataset) -> list[str]:
    """The maps of a model's output: a generated token's (``map_choices``), else the stored relevancy methods and
    the attention of the token the output reads (``ATTENTION``)."""
    if has_answers(ds):
        return map_choices(ds)
    return [*ds.vli.relevancy_methods, ATTENTION]


def output_map(ds: xr.Dataset, example: str, method: str, step: int = 0) -> np.ndarray:
    """One value per real token of ``example``: generated token ``step``'s map (the last one past the answer), or
    the output's (a stored relevancy method, or ``ATTENTION``: the last layer's head mean of the token it reads)."""
    tokens = ds.vli.tokens(example)
    if has_answers(ds):
        steps = len(ds.vli.answer(example))
        values = ds.vli.answer_map(example, min(step, steps - 1), method) if steps else np.zeros(tokens.n_tokens)
    elif method != ATTENTION:
        values = ds.vli.relevancy(example, method).values
    else:
        readout = ds["readout_token"].sel(example=example).values.ravel() if "readout_token" in ds else [0]
        values = ds.vli.token_attention(example, -1, None, max(int(readout[0]), 0)).values
    return np.asarray(values, dtype=np.float64)


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
    values = method_maps(ds, method, layer, head).isel(example=position, step=step)
    return np.nan_to_num(np.asarray(values.values, dtype=np.float64)[..., :n_tokens])


def method_maps(ds: xr.Dataset, method: str = ATTENTION, layer: int = -1, head: int | None = None) -> xr.DataArray:
    """The lazy ``(example, step, token)`` maps of generated tokens that ``method`` names.

    A stored answer relevancy method, or ``ATTENTION``: the answer rows of ``layer`` (a
    position on the layer axis) and ``head`` (a position on the head axis; None for the mean).
    """
    _require_answers(ds)
    if method == ATTENTION:
        if "answer_attention" not in ds:
            raise VLIError("this store has no answer attention rows (answer_attention)")
        rows = ds["answer_attention"].isel(layer=layer)
        return (rows.mean("head") if head is None else rows.isel(head=head)).rename(key="token")
    methods = answer_methods(ds)
    if method not in methods:
        stored = ", ".join(methods) or "none"
        raise VLIError(f"answer relevancy method {method!r} is not in this store (stored: {stored})")
    return ds["answer_relevancy"].isel(relevancy_method=methods.index(method))


RELIANCE_PARTS = ("image", "prompt", "answer")


def reliance_shares(maps: np.ndarray, is_image: np.ndarray, answer_start: np.ndarray | int) -> np.ndarray:
    """Shares ``[..., steps, 3]`` (``RELIANCE_PARTS``) of maps ``[..., steps, tokens]`` on the image, prompt and answer.

    ``is_image`` ``[..., tokens]`` marks the image tokens, ``answer_start`` ``[...]`` the
    sequence position of the first generated token (tokens before it, not image, are the
    prompt). Negative values count as 0; a map with nothing positive gets NaN shares.
    """
    positive = np.clip(np.nan_to_num(np.asarray(maps, dtype=np.float64)), 0, None)
    image = np.asarray(is_image, dtype=bool)[..., None, : positive.shape[-1]]
    before = np.arange(positive.shape[-1]) < np.asarray(answer_start)[..., None, None]
    parts = (image, ~image & before, ~image & ~before)
    sums = np.stack([np.where(part, positive, 0.0).sum(axis=-1) for part in parts], axis=-1)
    total = sums.sum(axis=-1, keepdims=True)
    return np.divide(sums, total, out=np.full_like(sums, np.nan), where=total > 0)


def reliance(maps: np.ndarray, modality: np.ndarray, answer_start: int) -> pd.DataFrame:
    """Share of each generated token's map (``maps`` ``[steps, tokens]``) on the image, the prompt and the answer.

    ``modality`` per token; the rule is ``reliance_shares``.
    """
    shares = reliance_shares(maps, np.asarray(modality) == IMAGE, answer_start)
    return pd.DataFrame(shares, columns=list(RELIANCE_PARTS)).rename_axis("step")


def dataset_reliance(ds: xr.Dataset, method: str = ATTENTION, layer: int = -1, head: int | None = None) -> xr.DataArray:
    """``reliance`` of every generated token of every example: ``(example, step, part)``, NaN past each answer.

    One vectorised read of the method's maps (``method_maps``).
    """
    maps = method_maps(ds, method, layer, head).transpose("example", "step", "token").values
    positions = ds["answer_position"].values
    shares = reliance_shares(maps, ds["modality"].values == IMAGE, positions[:, 0])
    shares[positions < 0] = np.nan
    return xr.DataArray(
        shares,
        dims=("example", "step", "part"),
        coords={"example": ds["example"].values, "step": ds["step"].values, "part": list(RELIANCE_PARTS)},
        name="reliance",
    )
