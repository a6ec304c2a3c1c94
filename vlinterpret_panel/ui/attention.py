"""Attention heatmap: the full query × key matrix of the selected head (or the head mean), modality blocks marked.

Plot coordinates are token positions, query 0 at the top (the schema's row-0-at-top convention);
a tap on a row makes that query the selected token. The hover names the query and key tokens
(a Bokeh ``CustomJSHover`` given each frame's token names), not the pointer's coordinates.
Large maps are rasterised with datashader. "Show the head mean" draws the layer's head mean as
a second plot on the same colour range (``mean_view``, placed by the dashboard).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import holoviews as hv
import numpy as np
import panel as pn
import param
import xarray as xr
from bokeh.models import CustomJSHover, HoverTool
from holoviews.operation.datashader import rasterize

from vlinterpret_panel.ui.common import MATRIX_SIZE, SELECTED_COLOR, checkbox, dynamic_map, fit_title, guarded
from vlinterpret_panel.ui.scales import colorbar_options, map_scale
from vlinterpret_panel.ui.selection import Selection
from vlinterpret_panel.ui.view import View

RASTERIZE_ABOVE_TOKENS = 400
LABEL_TICKS_UP_TO = 40
TICK_LABEL_CHARACTERS = 14
_TOKEN_NAME_JS = "const i = Math.floor(value); return (i >= 0 && i < names.length) ? names[i] : '';"


def matrix_image(matrix: np.ndarray) -> hv.Image:
    """A (query, key) matrix as an image whose plot y is the query position (flip for row 0 = top)."""
    n_queries, n_keys = matrix.shape
    return hv.Image(matrix[::-1], bounds=(0, 0, n_keys, n_queries), kdims=["key", "query"], vdims=["attention"])


def token_names(token_text: Sequence[str]) -> list[str]:
    """``position:text`` for every token (the hover's and the axes' names)."""
    return [f"{position}:{text}" for position, text in enumerate(token_text)]


def token_ticks(token_text: Sequence[str]) -> list[tuple[float, str]] | None:
    """Token labels as axis ticks when there are few enough to read (shortened); else None (hover tells)."""
    if len(token_text) > LABEL_TICKS_UP_TO:
        return None
    return [(position + 0.5, name[:TICK_LABEL_CHARACTERS]) for position, name in enumerate(token_names(token_text))]


def token_hover() -> HoverTool:
    """A hover tool naming the query and key tokens under the pointer; ``name_tokens`` fills in the names."""
    names = CustomJSHover(code=_TOKEN_NAME_JS, args={"names": []})
    return HoverTool(
        tooltips=[("query", "$y{names}"), ("key", "$x{names}"), ("attention", "@image{0.000f}")],
        formatters={"$x": names, "$y": names},
    )


def name_tokens(names: list[str], plot: object, element: object) -> None:
    """HoloViews hook: give the plot's token hover this frame's token names."""
    for tool in plot.state.tools:  # type: ignore[attr-defined]
        if isinstance(tool, HoverTool):
            for formatter in (tool.formatters or {}).values():
                if isinstance(formatter, CustomJSHover):
                    formatter.args = {"names": names}


def modality_boundaries(modality: np.ndarray) -> list[float]:
    """Positions where the modality changes: the edges of the modality blocks."""
    return [float(position) for position in np.flatnonzero(modality[1:] != modality[:-1]) + 1]


class AttentionHeatmap(View):
    """The attention matrix of the selected layer and head, with the selected token's row outlined."""

    show_mean = param.Boolean(default=False, doc="show the layer's head mean beside the selected head")

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(ds, selection, **params)
        fields = ("example", "layer", "head", "scale")
        matrix = dynamic_map(self._matrix, streams=self.streams(*fields))
        mean = dynamic_map(self._head_mean, streams=self.streams("example", "layer", "scale"))
        if ds.sizes["query"] > RASTERIZE_ABOVE_TOKENS:
            matrix = rasterize(matrix, aggregator="mean").opts(cmap="inferno", tools=["hover"], **colorbar_options())
            mean = rasterize(mean, aggregator="mean").opts(cmap="inferno", tools=["hover"], **colorbar_options())
        self._matrix_plot = matrix
        self._blocks = dynamic_map(self._block_edges, streams=self.streams("example"))
        self._marker = dynamic_map(self._selected_rows, streams=self.streams("example", "tokens", "direction"))
        self.tap = hv.streams.Tap(source=matrix, x=None, y=None)
        self.tap.add_subscriber(self._tapped)
        self._mean_plot = mean * self._blocks

    def _head_mean(self, example: str, layer: int, scale: str, ds: xr.Dataset) -> hv.Image:
        return self._matrix(example, layer, None, scale, ds)

    def mean_view(self) -> pn.viewable.Viewable:
        """The layer's head mean as its own plot, built only while shown (hidden, it costs a click nothing)."""

        def beside(show_mean: bool) -> pn.viewable.Viewable | None:
            return pn.pane.HoloViews(self._mean_plot, linked_axes=False) if show_mean else None

        return pn.panel(pn.bind(beside, self.param.show_mean))  # type: ignore[return-value]

    def _empty(self, message: str) -> hv.Image:
        return hv.Image(np.zeros((1, 1)), kdims=["key", "query"], vdims=["attention"]).opts(title=message[:80])

    def _matrix(self, example: str, layer: int, head: int | None, scale: str, ds: xr.Dataset) -> hv.Image:
        """One head's matrix (None: the head mean); ``scale="shared"`` spans this head and the layer's mean."""

        @guarded(self.selection, self._empty)
        def draw() -> hv.Image:
            matrix = ds.vli.attention_map(example, layer, head)
            others = [ds.vli.attention_map(example, layer, None).values] if scale == "shared" else []
            colour_range = map_scale(matrix.values, scale, shared_with=others)
            names = token_names(matrix["query_text"].values)
            ticks = token_ticks(matrix["query_text"].values)
            head_name = "mean of heads" if head is None else f"head {head}"
            title = f"layer {layer}, {head_name}" + (": all 0" if colour_range.all_zero else "")
            colour = colour_range.options("attention")
            return matrix_image(matrix.values).opts(
                title=fit_title(title, MATRIX_SIZE),
                frame_width=MATRIX_SIZE,
                frame_height=MATRIX_SIZE,
                invert_yaxis=True,
                xticks=ticks,
                yticks=ticks,
                xrotation=90,
                fontsize={"ticks": 7},
                tools=[token_hover()],
                hooks=[partial(name_tokens, names), *colour.pop("hooks")],
                **colour,
            )

        return draw()

    def _block_edges(self, example: str, ds: xr.Dataset) -> hv.Segments:
        tokens = ds.vli.tokens(example)
        n_tokens = tokens.n_tokens
        edges = modality_boundaries(tokens.modality)
        segments = [(edge, 0, edge, n_tokens) for edge in edges] + [(0, edge, n_tokens, edge) for edge in edges]
        return hv.Segments(segments, ["x0", "y0", "x1", "y1"]).opts(
            color="white", line_width=1, line_dash="dashed", alpha=0.7
        )

    def _selected_rows(self, example: str, tokens: list[int], direction: str, ds: xr.Dataset) -> hv.Rectangles:
        n_tokens = ds.vli.tokens(example).n_tokens
        if direction == "from":  # the selected tokens' rows
            boxes = [(0, t, n_tokens, t + 1) for t in tokens if t < n_tokens]
        else:  # their columns
            boxes = [(t, 0, t + 1, n_tokens) for t in tokens if t < n_tokens]
        return hv.Rectangles(boxes).opts(fill_alpha=0, line_color=SELECTED_COLOR, line_width=2)

    def _tapped(self, x: float | None, y: float | None) -> None:
        if x is None or y is None:
            return
        n_tokens = self.ds.vli.tokens(self.selection.example).n_tokens
        position = int(np.floor(y if self.selection.direction == "from" else x))
        if 0 <= position < n_tokens:
            self.selection.select(tokens=[position])

    def __panel__(self) -> pn.viewable.Viewable:
        toggle = checkbox(self, "show_mean", "show the head mean too")
        return pn.Column(toggle, pn.pane.HoloViews(self._matrix_plot * self._blocks * self._marker, linked_axes=False))
