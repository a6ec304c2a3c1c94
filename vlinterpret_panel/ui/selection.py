"""The one shared selection every view watches and sets; its core lives in the URL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import panel as pn
import param
import xarray as xr
from panel.io.document import hold

from vlinterpret_panel.maps import DIRECTIONS
from vlinterpret_panel.relevancy.targets import split_entry
from vlinterpret_panel.schema import IMAGE, TEXT
from vlinterpret_panel.ui.scales import DEFAULT_OPACITY, SCALES

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
        return int(str(value))


class ExampleParameter(param.Selector):
    """An example id; always a string in and out of the URL (``?example=3`` names the id "3", not a number)."""

    @classmethod
    def serialize(cls, value: object) -> str | None:
        return None if value is None else str(value)

    @classmethod
    def deserialize(cls, value: object) -> str | None:
        return None if value is None else str(value)


class Selection(param.Parameterized):
    """What the user looks at: example, layer, head (None = mean of heads), token(s) and how to show them."""

    example = ExampleParameter(default=None, objects=[], check_on_set=True, doc="id of the example shown")
    layer = param.Integer(default=0, bounds=(0, None), doc="attention module")
    head = HeadParameter(default=None, allow_None=True, bounds=(0, None), doc="head; None = mean of the heads")
    tokens = param.List(default=[], item_type=int, doc="selected token positions (several are averaged)")
    direction: str = param.Selector(  # type: ignore[assignment]
        default="from", objects=list(DIRECTIONS), doc="attention from or to the token(s)"
    )
    smooth = param.Boolean(default=False, doc="bilinear smoothing of patch maps")
    scale: str = param.Selector(  # type: ignore[assignment]
        default="per map", objects=list(SCALES), doc="colour range of the maps"
    )
    opacity = param.Number(default=DEFAULT_OPACITY, bounds=(0, 1), doc="opacity of a map's top value on the image")
    hidden_layer = param.Integer(default=0, bounds=(0, None), doc="hidden state shown in the embedding view")
    statistic = param.String(default="cross_modal", doc="head-summary statistic")
    normalize: str = param.Selector(  # type: ignore[assignment]
        default="raw", objects=list(NORMALIZATIONS), doc="head-summary normalisation"
    )
    scope: str = param.Selector(  # type: ignore[assignment]
        default="example", objects=list(SCOPES), doc="head summary of the example or a set"
    )
    subset = param.List(default=[], item_type=str, doc="ids of the examples the browser's filters keep")
    relevancy_method = param.String(default="", doc="relevancy method shown")
    relevancy_answer = param.String(default="", doc="answer the relevancy explains; empty: the prediction")
    relevancy_versus = param.String(default="", doc="second answer of a contrast; empty: none")
    message = param.String(default="", doc="the last user error, shown instead of a traceback")

    @classmethod
    def for_dataset(cls, ds: xr.Dataset, **params) -> Selection:
        """A selection with bounds from ``ds`` that shows something on the first screen (``default_focus``).

        The first example, the head mean, and the last layer in which its first text token
        (else an output head's readout token, else its first image token) attends the image.
        """
        ids = [str(i) for i in ds.indexes["example"]]
        selection = cls(layer=ds.sizes["layer"] - 1, hidden_layer=ds.sizes["hidden_layer"] - 1, subset=ids)
        selection.adopt(ds)
        selection.example = ids[0]
        methods = ds.vli.relevancy_methods
        if methods:
            selection.relevancy_method = split_entry(ds.vli.best_relevancy_method() or methods[0])[0]
        selection.layer, selection.tokens = default_focus(ds, ids[0])
        kinds = set(ds["layer_kind"].values.tolist())
        if not kinds & {"self", "cross_text_to_image", "cross_image_to_text"}:
            selection.statistic = "intra_modal"  # two towers (a dual encoder): nothing is cross-modal
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
        """Set several fields at once; linked plots update inside one held document change (``batched``)."""
        with batched():
            self.param.update(**changes)


@contextmanager
def batched() -> Iterator[None]:
    """Hold the session's document changes and defer Bokeh's model-graph walk to the end, if one is needed.

    Every plot HoloViews refreshes freezes the document and walks all its models when it thaws
    (``Document.models.recompute``): once per plot, ~1 s a click on a large page. Panel's
    ``hold(freeze=True)`` walks once, at the end: still 55-75 ms a click on the benchmark page,
    though a click sets only data, titles and ranges, never a model reference. Bokeh asks for the
    walk (``models.invalidate()``) exactly when a changed value references models; here that
    request is noted while frozen and the walk runs at the end only if one came.
    """
    doc = pn.state.curdoc
    models = getattr(doc, "models", None)
    if doc is None or models is None:
        with hold():
            yield
        return
    if "invalidate" in vars(models):  # nested: the outermost batched() decides
        with hold(doc):
            yield
        return
    requested = False

    def note_request() -> None:
        nonlocal requested
        requested = True

    with hold(doc):
        models._push_freeze()
        models.invalidate = note_request  # frozen, Bokeh's own invalidate would do nothing now
        try:
            yield
        finally:
            del models.invalidate
            models._freeze_count -= 1
            if models._freeze_count == 0 and requested:
                models.recompute()


WidgetType = TypeVar("WidgetType", bound=pn.widgets.Widget)


def batched_widget(
    widget_type: type[WidgetType], owner: param.Parameterized, parameter_name: str, **params: Any
) -> WidgetType:
    """A widget for the param ``owner.<parameter_name>``, linked both ways as ``from_param`` links it, whose changes
    set the param inside ``batched()``: linked by ``from_param``, each plot a layer change refreshed walked all the
    page's models (a layer click cost ~100 ms more server time than a head click, which goes through ``select``).

    A selector's options and a number's ``start``/``end`` come from the param unless given, and then follow it
    (a grown store's ``adopt`` changes the layer's bounds).
    """
    parameter = owner.param[parameter_name]
    defaults: dict[str, Any]
    if isinstance(parameter, param.Selector):
        follows, defaults = "objects", {"options": list(parameter.objects)}
    else:
        low, high = getattr(parameter, "bounds", None) or (None, None)
        follows, defaults = "bounds", {"start": low, "end": high}
    if set(defaults) & set(params):  # fixed by the caller: not followed
        follows = ""
    widget = widget_type(value=getattr(owner, parameter_name), **{**defaults, **params})

    def changed(event: param.parameterized.Event) -> None:
        if getattr(owner, parameter_name) != event.new:
            with batched():
                setattr(owner, parameter_name, event.new)

    def shown(event: param.parameterized.Event) -> None:
        widget.value = event.new

    def range_changed(event: param.parameterized.Event) -> None:
        if follows == "objects":
            widget.param.update(options=list(event.new))
        else:
            widget.param.update(start=event.new[0], end=event.new[1])

    widget.param.watch(changed, "value")
    owner.param.watch(shown, parameter_name)
    if follows:
        owner.param.watch(range_changed, parameter_name, what=follows)
    return widget


def default_focus(ds: xr.Dataset, example: str) -> tuple[int, list[int]]:
    """A (layer, [token]) whose attention shows on the image: a query token that attends image tokens there.

    Candidates in order: the first text token, the tokens output heads read, the first image
    token; layers from the last. A dual-stream model's last layer may be an image-only
    layer and a dual encoder's text tower never sees the image: their first screens would
    otherwise show an empty image map. Falls back to the last layer and ``default_tokens``.
    """
    info = ds.vli.tokens(example)
    image = info.tokens_of(IMAGE)
    fallback = (ds.sizes["layer"] - 1, default_tokens(ds, example))
    if not len(image) or "attention" not in ds:  # only generated answers' rows: nothing to search
        return fallback
    candidates = [int(t) for t in info.tokens_of(TEXT)[:1]]
    if "readout_token" in ds:
        readouts = ds["readout_token"].isel(example=info.index).values
        candidates += [int(t) for t in readouts if 0 <= t < info.n_tokens]
    candidates.append(int(image[0]))
    heads = ds["layer_heads"].values if "layer_heads" in ds.coords else [ds.sizes["head"]] * ds.sizes["layer"]
    for token in dict.fromkeys(candidates):
        for layer in range(ds.sizes["layer"] - 1, -1, -1):
            block = ds.vli.layer_block(example, layer)  # (head, query, key), real tokens
            if np.nansum(block[: int(heads[layer]), token][:, image]) > 1e-6:
                return layer, [token]
    return fallback


def default_tokens(ds: xr.Dataset, example: str) -> list[int]:
    """The token selected when an example opens: its first text token (else its first token)."""
    text_tokens = ds.vli.tokens(example).tokens_of(TEXT)
    return [int(text_tokens[0])] if len(text_tokens) else [0]


def valid_tokens(ds: xr.Dataset, example: str, tokens: list[int]) -> list[int]:
    """``tokens`` that exist in ``example``; the default token when none does."""
    n_tokens = ds.vli.tokens(example).n_tokens
    kept = [int(t) for t in np.unique(tokens) if 0 <= t < n_tokens]
    return kept or default_tokens(ds, example)
