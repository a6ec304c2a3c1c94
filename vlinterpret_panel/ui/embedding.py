"""Embedding view: all tokens of all examples projected per hidden layer into one shared map.

The cloud is datashaded (re-rasterised on zoom through RangeXY), coloured by modality, label or
example; the current example's tokens are drawn on top with hover, the selected token starred and
its nearest token of the other modality marked. Hovering one of them outlines it on the example's
image beside the map (VL-InterpreT's hover preview); a tap selects it. A box selection lists the
tokens inside it, and a table gives the selected token's nearest neighbours across the dataset in
hidden space. A layer's map of a large store is computed in the background (``ui.background``):
the view says so and draws itself when the map is ready, while the other views keep answering.
"""

from __future__ import annotations

import html
from concurrent.futures import Future

import colorcet
import datashader
import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param
import xarray as xr
from holoviews.operation.datashader import datashade, dynspread

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import IMAGE, TEXT
from vlinterpret_panel.ui.background import Redraw, pending_for_store
from vlinterpret_panel.ui.common import SELECTED_COLOR, dynamic_map, fit_title, guarded, heading
from vlinterpret_panel.ui.image import image_element
from vlinterpret_panel.ui.selection import Selection
from vlinterpret_panel.ui.view import View

COLOR_BY = ("modality", "label", "correct", "example")
LISTED_POINTS = 200
PLAY_INTERVAL_MS = 1500
NEIGHBOUR_TEXT_CHARACTERS = 20
PREVIEW_SIZE = 200
LEGEND_ENTRIES = 16
HOVER_RADIUS = 0.03
"""How near (a share of the map's larger extent) the pointer must be to a token to preview it."""
HOVER_COLOR = "#ff9f1c"
MAP_SIZE = 440
SPREAD_PIXELS = 3
"""Datashaded points are spread to at most this many pixels around each: single tokens stay visible."""
MARKER_KEY = (
    f'<span style="color:{SELECTED_COLOR}">&#9733;</span> the selected token &nbsp; '
    '<span style="color:red">&#10005;</span> its nearest token of the other modality (in this map) &nbsp; '
    "&#9675; this example's other tokens &nbsp; dots: every token of every example"
)
# Long example ids and texts stay on one line each in the tables.
_NO_WRAP = [":host table td, :host table th { white-space: nowrap; }"]
BACKGROUND_ABOVE_BYTES = 64 * 2**20
"""Hidden states of one layer above which its map, and its first read for the search, run in the background."""


def _layer_bytes(ds: xr.Dataset) -> int:
    """Bytes of one hidden layer's states (decoded), from the metadata."""
    return ds["hidden_states"].nbytes // max(1, ds.sizes["hidden_layer"])


def projection_in_background(ds: xr.Dataset, hidden_layer: int) -> Future | None:
    """The running computation of a layer's map (``projection_table``), or None when it can be read now.

    None for layers of at most ``BACKGROUND_ABOVE_BYTES`` and for datasets without a store path.
    """
    return pending_for_store(
        ds,
        ("projection", int(hidden_layer)),
        nbytes=_layer_bytes(ds),
        above=BACKGROUND_ABOVE_BYTES,
        is_ready=lambda: ds.vli.projection_ready(hidden_layer),
        compute=lambda: ds.vli.projection_table(hidden_layer),
    )


def _empty_cloud(categories: list[str] | None = None) -> hv.Points:
    """A cloud with no points that datashader can still shade: it needs a range and at least one category.

    The plot keeps the legend of its first frame, so a placeholder drawn before the map is
    ready carries the categories the map will have (``cloud_categories``).
    """
    points = pd.DataFrame({"x": [], "y": [], "category": pd.Categorical([], categories=categories or [""])})
    return hv.Points(points, ["x", "y"], ["category"]).redim.range(x=(0, 1), y=(0, 1))


def cloud_categories(ds: xr.Dataset, color_by: str) -> list[str]:
    """The colour categories of the map for ``color_by``, in the order the map's categorical gets them, without it."""
    return ds.vli.categories(color_by)


def search_in_background(ds: xr.Dataset, hidden_layer: int) -> Future | None:
    """The running first read of a layer for ``nearest_tokens``, or None when a search can run now.

    Same rule as ``projection_in_background``: large layers of stores with a path only.
    """
    return pending_for_store(
        ds,
        ("neighbours", int(hidden_layer)),
        nbytes=_layer_bytes(ds),
        above=BACKGROUND_ABOVE_BYTES,
        is_ready=lambda: ds.vli.search_ready(hidden_layer),
        compute=lambda: ds.vli.prepare_search(hidden_layer),
    )


def other_modality(modality: str) -> str | None:
    """The modality a token's cross-modal neighbour has (text ↔ image); None for others."""
    return {TEXT: IMAGE, IMAGE: TEXT}.get(modality)


class EmbeddingView(View):
    """Hidden-state projection per layer, with play, colouring, point listing and nearest neighbours."""

    color_by: str = param.Selector(  # type: ignore[assignment]
        default="modality", objects=list(COLOR_BY)
    )
    hovered = param.Integer(default=None, allow_None=True, doc="The current example's token under the pointer.")

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(ds, selection, **params)
        selection = self.selection
        self.param.color_by.objects = [name for name in COLOR_BY if name in ds or name in ("modality", "example")]
        self.redraw = Redraw()  # once a layer's map, computed in the background, is ready
        self.neighbours_redraw = Redraw()  # once a layer is read for the nearest-token search
        self._status = pn.pane.Alert("", alert_type="info", visible=False, width=MAP_SIZE + 60)
        cloud = dynamic_map(
            self._cloud,
            streams=[*self.streams("hidden_layer"), hv.streams.Params(self, ["color_by"]), self.redraw.stream],
        )
        # Each layer's map has its own extent: a transient RangeXY forgets the last zoom once it
        # has been used and ``framewise`` refits the axes to each new map (HoloViews #1434).
        shaded = datashade(
            cloud,
            aggregator=datashader.count_cat("category"),
            color_key=list(colorcet.glasbey),
            streams=[hv.streams.RangeXY(transient=True)],
        )
        # The plot would keep its first frame's legend whatever the colouring: ``legend`` draws it.
        self._cloud_plot = dynspread(shaded, max_px=SPREAD_PIXELS, threshold=0.8).opts(
            tools=["box_select"],
            frame_width=MAP_SIZE,
            frame_height=MAP_SIZE,
            framewise=True,
            show_legend=False,
        )
        self._cloud_plot = self._cloud_plot.apply.opts(
            title=pn.bind(self.title, selection.param.hidden_layer, self.param.color_by)
        )
        self._current = dynamic_map(
            self._current_tokens,
            streams=[*self.streams("hidden_layer", "example", "tokens"), self.redraw.stream],
        )
        self.bounds = hv.streams.BoundsXY(source=self._cloud_plot, bounds=None)
        self._listed = pn.pane.DataFrame(
            pd.DataFrame(), max_rows=LISTED_POINTS, sizing_mode="stretch_width", stylesheets=_NO_WRAP
        )
        self.bounds.add_subscriber(self._list_points)
        self.tap = hv.streams.Tap(source=self._cloud_plot, x=None, y=None)
        self.tap.add_subscriber(self._tapped)
        self.pointer = hv.streams.PointerXY(source=self._cloud_plot, x=None, y=None)
        self.pointer.add_subscriber(self._pointed)
        selection.param.watch(lambda event: setattr(self, "hovered", None), ["example", "hidden_layer"])
        self._preview = dynamic_map(
            self._patch_preview,
            streams=[*self.streams("example", "tokens"), hv.streams.Params(self, ["hovered"])],
        )
        self._play = pn.widgets.Player(
            label="hidden layer",
            start=0,
            end=ds.sizes["hidden_layer"] - 1,
            value=selection.hidden_layer,
            interval=PLAY_INTERVAL_MS,
            show_loop_controls=False,
            show_value=True,
            width=300,
        )
        self._play.link(selection, value="hidden_layer", bidirectional=True)

    def ready_table(self, hidden_layer: int) -> pd.DataFrame | None:
        """The layer's map as a table, or None while it is computed in the background (the views redraw then)."""
        ds = self.ds
        if ds.vli.projection_ready(hidden_layer):  # loaded: every pointer move comes here
            self._status.visible = False
            return ds.vli.projection_table(hidden_layer)
        running = projection_in_background(ds, hidden_layer)
        if running is not None:
            self.redraw.when_done(running)
            tokens = int(ds["seq_len"].sum()) if "seq_len" in ds else None
            of = f" for {tokens:,} tokens" if tokens else ""
            self._status.object = f"Computing the map of hidden layer {hidden_layer}{of} (once per store)..."
            self._status.visible = True
            return None
        self._status.visible = False
        return ds.vli.projection_table(hidden_layer)

    def _cloud(self, hidden_layer: int, color_by: str, ds: xr.Dataset, counter: int = 0) -> hv.Points:
        @guarded(self.selection, lambda message: _empty_cloud().opts(title=message[:80]))
        def draw() -> hv.Points:
            table = self.ready_table(hidden_layer)
            if table is None:
                return _empty_cloud(cloud_categories(ds, color_by))
            categories = table[color_by].astype(str) if color_by in table else table["modality"].astype(str)
            points = pd.DataFrame({"x": table["x"], "y": table["y"], "category": categories.astype("category")})
            return hv.Points(points, ["x", "y"], ["category"])

        return draw()

    def legend(self, color_by: str) -> str:
        """The map's colour key as HTML: each category's colour as datashader gives it (``LEGEND_ENTRIES`` at most)."""
        categories = cloud_categories(self.ds, color_by)
        entries = [
            f'<span style="white-space:nowrap;margin-right:12px"><span style="color:{color}">&#9679;</span> '
            f"{html.escape(name)}</span>"
            for name, color in zip(categories[:LEGEND_ENTRIES], colorcet.glasbey, strict=False)
        ]
        more = len(categories) - LEGEND_ENTRIES
        if more > 0:
            entries.append(f"<span>... and {more} more</span>")
        return f"<b>{html.escape(color_by)}</b>: " + " ".join(entries)

    def title(self, hidden_layer: int, color_by: str) -> str:
        """The cloud's title: which hidden state, and how it is coloured."""
        names = self.ds["hidden_layer_name"].values if "hidden_layer_name" in self.ds.coords else None
        name = f" ({names[hidden_layer]})" if names is not None else ""
        return fit_title(f"hidden layer {hidden_layer}{name} · all examples' tokens · colour: {color_by}", MAP_SIZE)

    def _current_tokens(
        self, hidden_layer: int, example: str, tokens: list[int], ds: xr.Dataset, counter: int = 0
    ) -> hv.Overlay:
        empty = hv.Points([], ["x", "y"], ["token", "token_text", "modality"])
        try:
            table = self.ready_table(hidden_layer)
        except (VLIError, ImportError):  # the cloud's callback reports the error once
            table = None
        if table is None:
            return empty * empty.clone() * empty.clone()
        mine = ds.vli.projection_rows(hidden_layer, example)
        current = hv.Points(mine, ["x", "y"], ["token", "token_text", "modality"]).opts(
            color="white", line_color="black", size=8, tools=["hover"]
        )
        chosen = mine[mine["token"].isin(tokens)]
        star = hv.Points(chosen, ["x", "y"], ["token", "token_text", "modality"]).opts(
            marker="star", size=18, color=SELECTED_COLOR, line_color="black"
        )
        partner = self._nearest_other_modality(mine, chosen)
        cross = hv.Points(partner, ["x", "y"], ["token", "token_text", "modality"]).opts(
            marker="x", size=16, color="red", line_width=3
        )
        return current * star * cross

    @staticmethod
    def _nearest_other_modality(mine: pd.DataFrame, chosen: pd.DataFrame) -> pd.DataFrame:
        """The current example's token of the other modality nearest the selected one, in the shared map."""
        if len(chosen) != 1 or other_modality(str(chosen["modality"].iloc[0])) is None:
            return mine.iloc[:0]
        others = mine[mine["modality"] == other_modality(str(chosen["modality"].iloc[0]))]
        if not len(others):
            return others
        distance = np.hypot(others["x"] - chosen["x"].iloc[0], others["y"] - chosen["y"].iloc[0])
        return others.iloc[[int(np.argmin(distance.to_numpy()))]]

    def token_near(self, x: float | None, y: float | None, *, within: float | None = None) -> int | None:
        """The current example's token nearest ``(x, y)`` in the map; None if none lies ``within`` that distance."""
        if x is None or y is None:
            return None
        table = self.ready_table(self.selection.hidden_layer)
        if table is None:
            return None
        mine = self.ds.vli.projection_rows(self.selection.hidden_layer, self.selection.example)
        if not len(mine):
            return None
        distance = np.hypot(mine["x"] - x, mine["y"] - y).to_numpy()
        nearest = int(np.argmin(distance))
        if within is not None and distance[nearest] > within:
            return None
        return int(mine["token"].iloc[nearest])

    def _tapped(self, x: float | None, y: float | None) -> None:
        """Select the current example's token nearest the tap in the map."""
        token = self.token_near(x, y)
        if token is not None:
            self.selection.select(tokens=[token])

    def _pointed(self, x: float | None, y: float | None) -> None:
        """Preview the current example's token under the pointer, if one is within ``HOVER_RADIUS``."""
        try:
            table = self.ready_table(self.selection.hidden_layer)
        except (VLIError, ImportError):  # the cloud's callback reports the error
            return
        if table is None:
            return
        extent = self.ds.vli.projection_extent(self.selection.hidden_layer)
        self.hovered = self.token_near(x, y, within=HOVER_RADIUS * extent)

    def _patch_preview(self, example: str, tokens: list[int], hovered: int | None, ds: xr.Dataset) -> hv.Overlay:
        """The example's image with the selected image tokens outlined, and the hovered one (VL-InterpreT's preview)."""
        info = ds.vli.tokens(example)

        def boxes(chosen: list[int]) -> list[tuple]:
            return [
                tuple(info.token_box[t]) for t in chosen if t < info.n_tokens and np.isfinite(info.token_box[t]).all()
            ]

        names = ", ".join(str(info.token_text[t]) for t in tokens[:3] if t < info.n_tokens)
        title = f"selected: {names}"
        if hovered is not None and hovered < info.n_tokens:
            title = f"hover: {info.token_text[hovered]}"
        picture = image_element(info.image).opts(
            invert_yaxis=True, xaxis=None, yaxis=None, frame_width=PREVIEW_SIZE, frame_height=PREVIEW_SIZE
        )
        selected = hv.Rectangles(boxes(tokens)).opts(fill_alpha=0, line_color=SELECTED_COLOR, line_width=3)
        under_pointer = hv.Rectangles(boxes([] if hovered is None else [hovered])).opts(
            fill_alpha=0, line_color=HOVER_COLOR, line_width=3, line_dash="dashed"
        )
        return (picture * selected * under_pointer).opts(title=title[:40])

    def _list_points(self, bounds: tuple[float, float, float, float] | None) -> None:
        if bounds is None:
            return
        x0, y0, x1, y1 = bounds
        table = self.ready_table(self.selection.hidden_layer)
        if table is None:
            return
        inside = table[table.x.between(min(x0, x1), max(x0, x1)) & table.y.between(min(y0, y1), max(y0, y1))]
        self._listed.object = inside.drop(columns=["x", "y"]).head(LISTED_POINTS)

    def neighbours(
        self, example: str, tokens: list[int], hidden_layer: int, counter: int = 0, ds: xr.Dataset | None = None
    ) -> pn.viewable.Viewable:
        """The selected token's nearest tokens across the dataset, in hidden space (not in the 2-D map)."""
        if len(tokens) != 1:
            return pn.pane.Markdown("Select one token to see its nearest neighbours.")
        try:
            running = search_in_background(self.ds, hidden_layer)
            if running is not None:
                self.neighbours_redraw.when_done(running)
                return pn.pane.Markdown(f"Reading hidden layer {hidden_layer} for the search (once per store)...")
            nearest = self.ds.vli.nearest_tokens(example, tokens[0], hidden_layer, k=10)
        except (VLIError, ImportError) as error:
            return pn.pane.Alert(str(error), alert_type="warning")
        shown = nearest.assign(text=nearest["text"].str.slice(0, NEIGHBOUR_TEXT_CHARACTERS))
        return pn.pane.DataFrame(shown, index=False, sizing_mode="stretch_width", stylesheets=_NO_WRAP)

    def __panel__(self) -> pn.viewable.Viewable:
        selection = self.selection
        neighbours = pn.param.ParamFunction(
            pn.bind(
                self.neighbours,
                selection.param.example,
                selection.param.tokens,
                selection.param.hidden_layer,
                self.neighbours_redraw.stream.param.counter,
                self.param.ds,
            ),
            lazy=True,
            loading_indicator=True,
        )
        controls = pn.Row(self._play, pn.widgets.Select.from_param(self.param.color_by, label="colour by", width=140))
        tables = pn.Column(
            pn.pane.HoloViews(self._preview, linked_axes=False),
            heading("Nearest tokens across the dataset", level=4),
            neighbours,
            heading("Tokens in the box selection", level=4),
            self._listed,
            width=640,
        )
        return pn.Column(
            controls,
            self._status,
            pn.Row(
                pn.Column(
                    pn.pane.HTML(pn.bind(self.legend, self.param.color_by), width=MAP_SIZE + 60),
                    pn.pane.HoloViews(self._cloud_plot * self._current, linked_axes=False),
                    pn.pane.HTML(MARKER_KEY, width=MAP_SIZE + 60),
                ),
                tables,
            ),
        )
