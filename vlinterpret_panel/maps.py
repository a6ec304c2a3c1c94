"""Attention maps of one example: the (query, key) matrix, a token's row or column, and maps on the image.

Pure functions: each reads at most one ``(example, layer)`` block of ``attention`` and a few
small per-example variables through a ``Reads`` object. The default reads straight from the
Dataset; ``ds.vli`` passes itself, so the same functions serve notebooks and dashboard clicks
from its caches (keyed by the dataset's identity), and a click costs one block read.

Image coordinates follow the schema: pixel row 0 is the top of the image, ``token_box`` is
``(x0, y0, x1, y1)`` in pixels. Modalities come from the ``modality`` labels only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import xarray as xr
from scipy import ndimage

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import IMAGE, require_full_attention

Direction = Literal["from", "to"]
DIRECTIONS: tuple[str, ...] = ("from", "to")


def example_position(ds: xr.Dataset, example: int | str) -> int:
    """Position of ``example`` in ``ds``: an index (negative counts from the end) or an example id.

    The one lookup of the package; ``VLIError`` naming what was asked otherwise.
    """
    ids = ds.indexes["example"]
    if isinstance(example, str):
        matches = np.flatnonzero(ids == example)
        if not len(matches):
            raise VLIError(f"example: {example!r} is not in this store (or this selection of it)")
        return int(matches[0])
    if isinstance(example, int | np.integer) and not isinstance(example, bool | np.bool_):
        if not -len(ids) <= example < len(ids):
            raise VLIError(f"example: index {example} is outside 0..{len(ids) - 1}")
        return int(example) % len(ids)
    raise VLIError(f"example: expected an index or an id string, got {type(example).__name__}")


@dataclass(frozen=True)
class ExampleTokens:
    """The small per-example variables every view needs, trimmed to the real tokens and image."""

    index: int
    example_id: str
    text: str
    token_text: np.ndarray
    modality: np.ndarray
    token_box: np.ndarray
    image: np.ndarray

    @property
    def n_tokens(self) -> int:
        return len(self.token_text)

    def tokens_of(self, *modalities: str) -> np.ndarray:
        """Positions of the tokens of the given modalities, in model order."""
        return np.flatnonzero(np.isin(self.modality, modalities))

    def image_tokens(self) -> np.ndarray:
        """Positions of the image tokens that have a box on the image."""
        has_box = np.all(np.isfinite(self.token_box), axis=1)
        return np.flatnonzero((self.modality == IMAGE) & has_box)

    def token_at(self, x: float, y: float) -> int | None:
        """The image token whose box contains pixel ``(x, y)`` (row 0 at the top), else None."""
        candidates = self.image_tokens()
        boxes = self.token_box[candidates]
        inside = (boxes[:, 0] <= x) & (x < boxes[:, 2]) & (boxes[:, 1] <= y) & (y < boxes[:, 3])
        hits = candidates[inside]
        if len(hits) == 0:
            return None
        x0, y0, x1, y1 = self.token_box[hits].T
        areas = (x1 - x0) * (y1 - y0)
        return int(hits[np.argmin(areas)])  # the tightest box wins where regions overlap


def read_example_tokens(ds: xr.Dataset, position: int) -> ExampleTokens:
    """Tokens, modalities, boxes, text and image of the example at ``position``, read from ``ds``."""
    one = ds[["token_text", "modality", "token_box", "seq_len", "text", "image_height", "image_width"]]
    one = one.isel(example=position).compute()
    n_tokens, height, width = int(one.seq_len), int(one.image_height), int(one.image_width)
    image = ds["image"].isel(example=position, image_y=slice(0, height), image_x=slice(0, width)).values
    return ExampleTokens(
        index=position,
        example_id=str(ds.indexes["example"][position]),
        text=str(one.text.values),
        token_text=one.token_text.values[:n_tokens].astype(str),
        modality=one.modality.values[:n_tokens].astype(str),
        token_box=one.token_box.values[:n_tokens].astype(np.float64),
        image=np.asarray(image, dtype=np.uint8),
    )


def check_layer(ds: xr.Dataset, layer: int) -> int:
    """``layer`` as a position on the ``layer`` axis, or a ``VLIError`` naming it."""
    if not 0 <= layer < ds.sizes["layer"]:
        raise VLIError(f"layer {layer} is outside 0..{ds.sizes['layer'] - 1}")
    return int(layer)


def read_layer_block(ds: xr.Dataset, position: int, layer: int, n_tokens: int) -> np.ndarray:
    """All heads of one (example, layer) attention block, ``(head, query, key)``, the first ``n_tokens`` only."""
    require_full_attention(ds, "an attention map")
    block = ds["attention"].isel(example=position, layer=layer, query=slice(0, n_tokens), key=slice(0, n_tokens))
    return np.asarray(block.values, dtype=np.float32)


class Reads(Protocol):
    """Where the map functions get an example's tokens and attention blocks from."""

    def tokens(self, example: int | str) -> ExampleTokens:
        """The example's ``ExampleTokens``."""
        ...

    def layer_block(self, example: int | str, layer: int) -> np.ndarray:
        """All heads of the example's attention block at ``layer``, real tokens only."""
        ...


class DirectReads:
    """``Reads`` straight from a Dataset, nothing kept (``ds.vli`` is the cached one)."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def tokens(self, example: int | str) -> ExampleTokens:
        return read_example_tokens(self._ds, example_position(self._ds, example))

    def layer_block(self, example: int | str, layer: int) -> np.ndarray:
        tokens = self.tokens(example)
        return read_layer_block(self._ds, tokens.index, check_layer(self._ds, layer), tokens.n_tokens)


def _reads(ds: xr.Dataset, reads: Reads | None) -> Reads:
    return DirectReads(ds) if reads is None else reads


def example_tokens(ds: xr.Dataset, example: int | str, *, reads: Reads | None = None) -> ExampleTokens:
    """Tokens, modalities, boxes, text and image of one example (``ds.vli.tokens`` caches them)."""
    return _reads(ds, reads).tokens(example)


def _heads_of(ds: xr.Dataset, layer: int) -> int:
    if "layer_heads" in ds.coords:
        return int(ds["layer_heads"].values[layer])
    return ds.sizes["head"]


def attention_map(
    ds: xr.Dataset, example: int | str, layer: int, head: int | None = None, *, reads: Reads | None = None
) -> xr.DataArray:
    """The ``(query, key)`` attention of one head (None: the mean of the layer's real heads).

    Trimmed to the example's real tokens, with ``token_text`` and ``modality`` on both axes.
    """
    reads = _reads(ds, reads)
    tokens = reads.tokens(example)
    chunk = reads.layer_block(example, layer)
    n_heads = _heads_of(ds, layer)
    if head is None:
        matrix = chunk[:n_heads].mean(axis=0)
        head_label = "mean"
    else:
        if not 0 <= head < n_heads:
            raise VLIError(f"head {head} is outside 0..{n_heads - 1} in layer {layer}")
        matrix = chunk[head]
        head_label = str(head)
    positions = np.arange(tokens.n_tokens)
    return xr.DataArray(
        matrix,
        dims=("query", "key"),
        coords={
            "query": positions,
            "key": positions,
            "query_text": ("query", tokens.token_text),
            "key_text": ("key", tokens.token_text),
            "query_modality": ("query", tokens.modality),
            "key_modality": ("key", tokens.modality),
        },
        name="attention",
        attrs={
            "long_name": "attention probability of query token to key token",
            "units": "1",
            "example": tokens.example_id,
            "layer": int(layer),
            "head": head_label,
        },
    )


def _as_tokens(token: int | Sequence[int], n_tokens: int) -> list[int]:
    selected = [int(token)] if isinstance(token, int | np.integer) else [int(t) for t in token]
    if not selected:
        raise VLIError("select at least one token")
    bad = [t for t in selected if not 0 <= t < n_tokens]
    if bad:
        raise VLIError(f"token(s) {bad} outside the example's 0..{n_tokens - 1}")
    return selected


def token_attention(
    ds: xr.Dataset,
    example: int | str,
    layer: int,
    head: int | None,
    token: int | Sequence[int],
    direction: Direction = "from",
    *,
    reads: Reads | None = None,
) -> xr.DataArray:
    """Attention from (``direction="from"``: the token's row) or to (its column) the token(s), per token.

    Several tokens (a box of patches, say) are averaged, as VL-InterpreT does.
    """
    if direction not in DIRECTIONS:
        raise VLIError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    matrix = attention_map(ds, example, layer, head, reads=reads)
    selected = _as_tokens(token, matrix.sizes["query"])
    reduced, kept = ("query", "key") if direction == "from" else ("key", "query")
    values = matrix.isel({reduced: selected}).mean(reduced)
    values = values.rename({kept: "token", f"{kept}_text": "token_text", f"{kept}_modality": "modality"})
    values.attrs.update(direction=direction, tokens=selected)
    return values


def values_on_image(
    ds: xr.Dataset,
    example: int | str,
    values: np.ndarray | xr.DataArray,
    smooth: bool = False,
    *,
    reads: Reads | None = None,
) -> xr.DataArray:
    """Paint one value per token over the image: each image token fills its box (NaN where none).

    ``smooth`` interpolates bilinearly between patch centres instead (VL-InterpreT's smoothing);
    it needs image tokens on a grid of boxes, else it falls back to a Gaussian blur of the boxes.
    """
    tokens = _reads(ds, reads).tokens(example)
    per_token = np.asarray(values, dtype=np.float64)
    if per_token.shape[0] < tokens.n_tokens:
        raise VLIError(f"{per_token.shape[0]} values for {tokens.n_tokens} tokens")
    height, width = tokens.image.shape[:2]
    painted = np.full((height, width), np.nan)
    image_tokens = tokens.image_tokens()
    widths, heights = (tokens.token_box[image_tokens, 2:] - tokens.token_box[image_tokens, :2]).T
    for position in image_tokens[np.argsort(-widths * heights, kind="stable")]:  # tightest boxes painted last
        x0, y0, x1, y1 = tokens.token_box[position]
        rows = slice(max(0, int(np.floor(y0))), min(height, int(np.ceil(y1))))
        cols = slice(max(0, int(np.floor(x0))), min(width, int(np.ceil(x1))))
        painted[rows, cols] = per_token[position]
    if smooth and len(image_tokens):
        painted = _smoothed(tokens, per_token, image_tokens, painted)
    return xr.DataArray(
        painted,
        dims=("image_y", "image_x"),
        coords={"image_y": np.arange(height), "image_x": np.arange(width)},
        name="value_on_image",
        attrs={"example": tokens.example_id},
    )


def _smoothed(
    tokens: ExampleTokens, per_token: np.ndarray, image_tokens: np.ndarray, painted: np.ndarray
) -> np.ndarray:
    """Bilinear interpolation between box centres when the boxes form a grid, else a Gaussian blur."""
    boxes = tokens.token_box[image_tokens]
    centre_x, centre_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    column_centres, column_of = np.unique(np.round(centre_x, 3), return_inverse=True)
    row_centres, row_of = np.unique(np.round(centre_y, 3), return_inverse=True)
    height, width = painted.shape
    cells = set(zip(row_of.tolist(), column_of.tolist(), strict=True))
    if len(row_centres) * len(column_centres) == len(image_tokens) == len(cells):
        grid = np.empty((len(row_centres), len(column_centres)))
        grid[row_of, column_of] = per_token[image_tokens]
        pixel_rows = np.interp(np.arange(height) + 0.5, row_centres, np.arange(len(row_centres)))
        pixel_cols = np.interp(np.arange(width) + 0.5, column_centres, np.arange(len(column_centres)))
        rows, cols = np.meshgrid(pixel_rows, pixel_cols, indexing="ij")
        return ndimage.map_coordinates(grid, [rows, cols], order=1, mode="nearest")
    sigma = max(1.0, float(np.median(boxes[:, 2] - boxes[:, 0])) / 2)
    covered = np.isfinite(painted)
    blurred = ndimage.gaussian_filter(np.where(covered, painted, 0.0), sigma)
    weight = ndimage.gaussian_filter(covered.astype(float), sigma)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 1e-3, blurred / weight, np.nan)


def token_attention_on_image(
    ds: xr.Dataset,
    example: int | str,
    layer: int,
    head: int | None,
    token: int | Sequence[int],
    direction: Direction = "from",
    smooth: bool = False,
    *,
    reads: Reads | None = None,
) -> xr.DataArray:
    """Attention from (or to) token(s) painted over the image's patches or boxes, ``(image_y, image_x)``."""
    values = token_attention(ds, example, layer, head, token, direction, reads=reads)
    painted = values_on_image(ds, example, values.values, smooth=smooth, reads=reads)
    painted.name = "attention_on_image"
    painted.attrs.update(values.attrs, layer=int(layer), head="mean" if head is None else int(head))
    return painted
