"""The one shared selection every view watches and sets; its core lives in the URL."""

from __future__ import annotations

import numpy as np
import param
import xarray as xr
from panel.io.document import hold

from vlinterpret_panel.maps import DIRECTIONS
from vlinterpret_panel.schema import TEXT

NORMALIZATIONS = ("raw", "zscore")
SCOPES = ("example", "dataset", "filtered")

# selection parameter -> URL query name: what a shared link reopens.
URL_PARAMETERS = {"example": "example", "layer": "layer", "head": "head", "tokens": "tokens", "hidden_layer": "hidden"}


MEAN_HEAD = "mean"


class HeadParameter(param.Integer):
    """A head index, or None for the mean of the heads; written ``mean`` in the URL."""

    @classmethod
    def serialize(cls, value: int | None) -> int | str:
        return MEAN_HEAD if value is None else value

    @classmethod
    def deserialize(cls, value: object) -> int | None:
        if value is None or str(value) in (MEAN_HEAD, "null", ""):
            return None
        return int(value)


class Selection(param.Parameterized):
    """What the user looks at: example, layer, head (None = mean of heads), token(s) and how to show them."""

    example = param.Selector(default=None, objects=[], check_on_set=True, doc="id of the example shown")
    layer = param.Integer(default=0, bounds=(0, None), doc="attention module")
    head = HeadParameter(default=None, allow_None=True, bounds=(0, None), doc="head; None = mean of the heads")
    tokens = param.List(default=[], item_type=int, doc="selected token positions (several are averaged)")
    direction = param.Selector(default="from", objects=list(DIRECTIONS), doc="attention from or to the token(s)")
    smooth = param.Boolean(default=False, doc="bilinear smoothing of patch maps")
    hidden_layer = param.Integer(default=0, bounds=(0, None), doc="hidden state shown in the embedding view")
    statistic = param.String(default="cross_modal", doc="head-summary statistic")
    normalize = param.Selector(default="raw", objects=list(NORMALIZATIONS), doc="head-summary normalisation")
    scope = param.Selector(default="example", objects=list(SCOPES), doc="head summary of the example or a set")
    subset = param.List(default=[], item_type=str, doc="ids of the examples the browser's filters keep")
    relevancy_method = param.String(default="", doc="relevancy method shown")
    message = param.String(default="", doc="the last user error, shown instead of a traceback")

    @classmethod
    def for_dataset(cls, ds: xr.Dataset, **params) -> Selection:
        """A selection with bounds from ``ds``: first example, last layer, head mean, its first text token."""
        ids = [str(i) for i in ds.indexes["example"]]
        selection = cls(layer=ds.sizes["layer"] - 1, hidden_layer=ds.sizes["hidden_layer"] - 1, subset=ids)
        selection.adopt(ds)
        selection.example = ids[0]
        if ds.vli.relevancy_methods:
            selection.relevancy_method = ds.vli.relevancy_methods[0]
        selection.tokens = default_tokens(ds, ids[0])
        selection.param.update(**params)
        return selection

    def adopt(self, ds: xr.Dataset) -> None:
        """Take the bounds of ``ds`` (a grown store) while keeping what is selected where it still fits."""
        ids = [str(i) for i in ds.indexes["example"]]
        self.param.example.objects = ids  # a link naming another store's example is refused
        self.param.layer.bounds = (0, ds.sizes["layer"] - 1)
        self.param.head.bounds = (0, ds.sizes["head"] - 1)
        self.param.hidden_layer.bounds = (0, ds.sizes["hidden_layer"] - 1)
        if self.example is not None and self.example not in ids:
            self.example = ids[0]

    def select(self, **changes) -> None:
        """Set several fields at once; linked plots update inside one held, frozen document change.

        Freezing defers Bokeh's walk over every model of the page to the end of the update,
        instead of once per plot that refreshes: the difference between ~100 ms and ~1 s per click.
        """
        with hold(freeze=True):
            self.param.update(**changes)


def default_tokens(ds: xr.Dataset, example: str) -> list[int]:
    """The token selected when an example opens: its first text token (else its first token)."""
    text_tokens = ds.vli.tokens(example).tokens_of(TEXT)
    return [int(text_tokens[0])] if len(text_tokens) else [0]


def valid_tokens(ds: xr.Dataset, example: str, tokens: list[int]) -> list[int]:
    """``tokens`` that exist in ``example``; the default token when none does."""
    n_tokens = ds.vli.tokens(example).n_tokens
    kept = [int(t) for t in np.unique(tokens) if 0 <= t < n_tokens]
    return kept or default_tokens(ds, example)
