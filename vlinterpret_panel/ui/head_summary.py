"""Head summary: a layer × head heatmap of one statistic, plus a per-layer Mean column; a tap picks the head.

The first summary of a large store's whole dataset (or a filtered set) needs every example's
statistics: minutes on a store of gigabytes. That runs in one background thread per server,
shared by every session asking for the same store, while the views keep answering; the
heatmap says so and redraws itself when the statistics are cached beside the store.
"""

from __future__ import annotations

from concurrent.futures import Future
from functools import partial

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import xarray as xr

from vlinterpret_panel.stats import STATISTICS, layer_means
from vlinterpret_panel.ui.background import Redraw, pending_for_store
from vlinterpret_panel.ui.common import SELECTED_COLOR, SUMMARY_SIZE, card_title, dynamic_map, fit_title, guarded
from vlinterpret_panel.ui.scales import colorbar_options, title_colorbar
from vlinterpret_panel.ui.selection import NORMALIZATIONS, SCOPES, Selection
from vlinterpret_panel.ui.view import View

MEAN_COLUMN = "mean"
BACKGROUND_ABOVE_BYTES = 256 * 2**20
"""Attention (decoded) above which a store's statistics are computed in the background: ~4 s of work here."""


def statistics_in_background(ds: xr.Dataset) -> Future | None:
    """The running computation of ``ds``'s statistics table, or None when a summary can be drawn now.

    None when the table is cached or the store is small (``BACKGROUND_ABOVE_BYTES``); see
    ``ui.background.pending_for_store``.
    """
    return pending_for_store(
        ds,
        ("head_statistics",),
        nbytes=ds["attention"].nbytes,
        above=BACKGROUND_ABOVE_BYTES,
        is_ready=lambda: ds.vli.cached_stats() is not None,
        compute=lambda: ds.vli.compute_stats(),
    )


def summary_table(
    ds: xr.Dataset, statistic: str, scope: str, example: str, subset: list[str], normalize: str
) -> pd.DataFrame:
    """Rows (layer, head, value, raw) of the summary, the Mean column included (head ``"mean"``)."""
    if scope == "example":
        summary = ds.vli.head_summary(statistic, example=example, normalize=normalize)
    else:
        where = None
        if scope == "filtered":
            where = xr.DataArray(np.isin(ds.indexes["example"], subset), dims="example")
        summary = ds.vli.head_summary(statistic, where=where, normalize=normalize)
    raw = summary["raw"] if "raw" in summary.coords else summary
    rows = []
    heads_per_layer = ds["layer_heads"].values if "layer_heads" in ds.coords else None
    for layer_position, layer in enumerate(summary["layer"].values):
        n_heads = int(heads_per_layer[layer_position]) if heads_per_layer is not None else summary.sizes["head"]
        for head in summary["head"].values[:n_heads]:
            cell = {"layer": layer, "head": head}
            rows.append(
                {
                    "layer": str(layer),
                    "head": str(head),
                    "value": float(summary.sel(cell)),
                    "raw": float(raw.sel(cell)),
                }
            )
    values, raws = (
        layer_means(summary.drop_vars("raw", errors="ignore")),
        layer_means(raw.drop_vars("raw", errors="ignore")),
    )
    for layer in summary["layer"].values:
        rows.append(
            {
                "layer": str(layer),
                "head": MEAN_COLUMN,
                "value": float(values.sel(layer=layer)),
                "raw": float(raws.sel(layer=layer)),
            }
        )
    return pd.DataFrame(rows)


class HeadSummary(View):
    """Which heads do what: one statistic per (layer, head), for this example, the dataset or the filtered set."""

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(ds, selection, **params)
        self._statistic_choice = pn.widgets.Select.from_param(
            self.selection.param.statistic, options=[], label="statistic", width=200
        )
        self.dataset_changed()
        summary_streams = self.streams("statistic", "scope", "example", "subset", "normalize")
        self.redraw = Redraw()  # once the dataset's statistics, computed in the background, are cached
        self._heatmap = dynamic_map(self._summary, streams=[*summary_streams, self.redraw.stream])
        self._marker = dynamic_map(self._selected_cell, streams=self.streams("layer", "head"))
        self.tap = hv.streams.Tap(source=self._heatmap, x=None, y=None)
        self.tap.add_subscriber(self._tapped)

    def dataset_changed(self) -> None:
        statistics = self.ds.vli.statistics()
        self._statistic_choice.options = statistics
        if self.selection.statistic not in statistics:
            self.selection.statistic = statistics[0]

    def _empty(self, message: str) -> hv.HeatMap:
        return hv.HeatMap([], ["head", "layer"], ["value", "raw"]).opts(
            title=fit_title(message, SUMMARY_SIZE + 40), colorbar=False
        )

    def _summary(
        self,
        statistic: str,
        scope: str,
        example: str,
        subset: list[str],
        normalize: str,
        ds: xr.Dataset,
        counter: int = 0,
    ) -> hv.HeatMap:
        @guarded(self.selection, self._empty)
        def draw() -> hv.HeatMap:
            if scope != "example" and statistic in STATISTICS:
                running = statistics_in_background(ds)
                if running is not None:
                    self.redraw.when_done(running)
                    return self._empty(f"computing statistics of {ds.sizes['example']} examples...")
            table = summary_table(ds, statistic, scope, example, subset, normalize)
            if not np.isfinite(table["raw"]).any():
                return self._empty(f"{statistic}: not defined for this model's layers")
            where = {"example": example, "dataset": "all examples", "filtered": f"{len(subset)} filtered examples"}
            units = "z-score per head" if normalize == "zscore" else "raw"
            return hv.HeatMap(table, ["head", "layer"], ["value", "raw"]).opts(
                title=fit_title(f"{statistic} · {where[scope]} ({units})", SUMMARY_SIZE + 40),
                xlabel="head",
                ylabel="layer",
                invert_yaxis=True,
                frame_width=SUMMARY_SIZE,
                frame_height=SUMMARY_SIZE,
                hover_tooltips=[("layer", "@layer"), ("head", "@head"), ("value", "@value"), ("raw", "@raw")],
                clim=(-3, 3) if normalize == "zscore" else (None, None),
                cmap="RdBu_r" if normalize == "zscore" else "inferno",
                clabel=f"{statistic} ({units})",
                hooks=[partial(title_colorbar, f"{statistic} ({units})")],
                tools=["hover"],
                **colorbar_options(),
            )

        return draw()

    def _selected_cell(self, layer: int, head: int | None, ds: xr.Dataset) -> hv.Points:
        """A square outline on the selected cell, sized to the cells (our marker: the data is never faded)."""
        column = MEAN_COLUMN if head is None else str(head)
        cell = SUMMARY_SIZE / max(ds.sizes["head"] + 1, ds.sizes["layer"])
        return hv.Points([(column, str(layer))], ["head", "layer"]).opts(
            marker="square", size=max(6, cell - 3), fill_alpha=0, line_color=SELECTED_COLOR, line_width=3, tools=[]
        )

    def _tapped(self, x: object, y: object) -> None:
        if x is None or y is None:
            return
        try:
            layer = int(str(y))
            head = None if str(x) == MEAN_COLUMN else int(str(x))
        except (TypeError, ValueError):
            return
        self.selection.select(layer=layer, head=head)

    def __panel__(self) -> pn.viewable.Viewable:
        scope = pn.widgets.RadioButtonGroup.from_param(self.selection.param.scope, options=list(SCOPES))
        normalize = pn.widgets.RadioButtonGroup.from_param(self.selection.param.normalize, options=list(NORMALIZATIONS))
        help_text = pn.Card(
            pn.pane.Markdown("\n".join(f"- **{name}**: {text}" for name, text in STATISTICS.items())),
            header=card_title("what the statistics mean"),
            collapsed=True,
            width=SUMMARY_SIZE + 150,
        )
        return pn.Column(
            self._statistic_choice,
            pn.Row(scope, normalize),
            pn.pane.HoloViews(self._heatmap * self._marker, linked_axes=False),
            help_text,
        )
