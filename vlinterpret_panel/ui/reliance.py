"""Modality reliance over a dataset: how much of each generated token's map lies on the image, by answer position.

For the examples the browser's filters keep (``selection.subset``), the mean share of a
method's map on the image, on the prompt and on the answer so far, at each answer position;
optionally the image share of correct and wrong answers apart. A tap at answer position k
lists the examples whose token k relies least on the image (the answers that may ignore it);
choosing a row opens that example.
"""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param
import xarray as xr

from vlinterpret_panel.answers import RELIANCE_PARTS
from vlinterpret_panel.ui.answer import AnswerMapView
from vlinterpret_panel.ui.common import NO_SELECTION_FADE, checkbox, dynamic_map, guarded
from vlinterpret_panel.ui.selection import Selection

PART_COLOURS = {"image": "#1f77b4", "prompt": "#ff7f0e", "answer": "#2ca02c"}
LISTED_EXAMPLES = 10
NOTHING_CHOSEN = "(tap an answer position, then choose an example)"
CURVE_WIDTH = 560
CHART_TITLE = "mean share of each generated token's map, by answer position (tap a position)"


class RelianceView(AnswerMapView):
    """Mean image / prompt / answer shares of generated tokens by answer position, over the filtered examples."""

    split = param.Boolean(default=False, doc="show the image share of correct and wrong answers apart")
    position = param.Integer(default=None, allow_None=True, doc="the answer position tapped last")

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(ds, selection, **params)
        self.dataset_changed()
        own = hv.streams.Params(self, ["method", "split", "position"])
        self._curves = dynamic_map(self._chart, streams=[own, *self.streams("subset")])
        # A tap on a DynamicMap of an Overlay reaches no callback; a transparent column per answer
        # position, drawn over the curves, takes the taps instead.
        self._columns = dynamic_map(self._position_columns, streams=[hv.streams.Params(self, ["ds"])])
        self.tap = hv.streams.Tap(source=self._columns, x=None, y=None)
        self.tap.add_subscriber(self._tapped)
        self._listed = pn.widgets.Select(
            label="examples at the tapped position, least image-reliant first (choose one to open it)",
            options={NOTHING_CHOSEN: ""},
            size=LISTED_EXAMPLES + 1,
            width=CURVE_WIDTH + 140,
        )
        self._listed.param.watch(self._row_chosen, "value")
        self.param.watch(self._update_list, ["position", "method"])
        self.selection.param.watch(self._update_list, "subset")

    def dataset_changed(self) -> None:
        """The maps this store offers; generic relevancy first shown."""
        self.offer_maps(first=not hasattr(self, "_listed"))  # first: called from the constructor

    def _shares(self, subset: list[str]) -> xr.DataArray:
        shares = self.ds.vli.dataset_reliance(self.method)
        kept = [example for example in subset if example in shares.indexes["example"]]
        return shares.sel(example=kept) if kept else shares.isel(example=slice(0, 0))

    def _chart(self, method: str, split: bool, position: int | None, subset: list[str], ds: xr.Dataset) -> hv.Overlay:
        @guarded(self.selection, lambda message: hv.Overlay([hv.Curve([])]).opts(title=message[:80]))
        def draw() -> hv.Overlay:
            shares = self._shares(subset)
            n = shares.sizes["example"]
            curves = []
            if split and "correct" in ds:
                correct = ds["correct"].sel(example=shares["example"]).values
                for value, name, dash in ((1, "correct", "solid"), (0, "wrong", "dashed")):
                    group = shares.isel(example=np.flatnonzero(correct == value))
                    mean = group.sel(part="image").mean("example")
                    label = f"image share, {name} ({group.sizes['example']})"
                    curves.append(
                        hv.Curve((mean["step"].values, mean.values), "answer position", "share", label=label).opts(
                            color=PART_COLOURS["image"], line_dash=dash, line_width=2
                        )
                    )
            else:
                for part in RELIANCE_PARTS:
                    mean = shares.sel(part=part).mean("example")
                    curves.append(
                        hv.Curve((mean["step"].values, mean.values), "answer position", "share", label=part).opts(
                            color=PART_COLOURS[part], line_width=2
                        )
                    )
            markers = [hv.VLine(position).opts(color="#00e5ff", line_width=2)] if position is not None else []
            return hv.Overlay([*curves, *markers]).opts(
                hv.opts.Curve(tools=["hover"], ylabel=f"share of the {method} map ({n} examples)"),
                hv.opts.Overlay(
                    frame_width=CURVE_WIDTH,
                    frame_height=220,
                    ylim=(0, 1),
                    legend_position="right",
                    toolbar=None,
                ),
            )

        return draw()

    def _position_columns(self, ds: xr.Dataset) -> hv.Rectangles:
        steps = np.arange(ds.sizes.get("step", 0))
        columns = {"x0": steps - 0.5, "y0": np.zeros(len(steps)), "x1": steps + 0.5, "y1": np.ones(len(steps))}
        return hv.Rectangles(columns).opts(fill_alpha=0, line_alpha=0, **NO_SELECTION_FADE)

    def _tapped(self, x: float | None, y: float | None) -> None:
        if x is not None:
            self.position = max(0, round(x))

    def _update_list(self, *events: param.parameterized.Event) -> None:
        """The filtered examples' token at the tapped position, least image-reliant first."""
        if self.position is None:
            return
        shares = self._shares(self.selection.subset)
        if self.position >= shares.sizes["step"]:
            self._listed.options = {NOTHING_CHOSEN: ""}
            return
        at = pd.DataFrame(shares.isel(step=self.position).to_pandas()).dropna().sort_values("image")
        at = at.head(LISTED_EXAMPLES).astype(np.float64)
        examples = [str(example) for example in at.index]
        tokens = self.ds["answer_token"].isel(step=self.position).sel(example=examples).values
        correct = self.ds["correct"].sel(example=examples).values if "correct" in self.ds else np.full(len(at), -1)
        options = {NOTHING_CHOSEN: ""}
        for (example, row), token, right in zip(at.iterrows(), tokens, correct, strict=True):
            verdict = {1: "", 0: " · wrong answer"}.get(int(right), "")
            label = (
                f"{example} · {str(token)!r} · image {row['image']:.2f}, prompt {row['prompt']:.2f}, "
                f"answer so far {row['answer']:.2f}{verdict}"
            )
            options[label] = str(example)
        self._listed.options = options
        self._listed.value = ""

    def _row_chosen(self, event: param.parameterized.Event) -> None:
        if event.new and event.new != self.selection.example:
            self.selection.example = str(event.new)

    def __panel__(self) -> pn.viewable.Viewable:
        if not self.ds.vli.has_answers:
            return pn.pane.Markdown("This store has no generated answers: extract with `--generate` to see them here.")
        method = pn.widgets.Select.from_param(self.param.method, label="map", width=170)
        split = checkbox(self, "split", "correct vs wrong answers (image share)")
        return pn.Column(
            pn.Row(method, split),
            pn.pane.HoloViews(
                (self._curves * self._columns).opts(
                    title=CHART_TITLE,
                    frame_width=CURVE_WIDTH,
                    frame_height=220,
                    ylim=(0, 1),
                    legend_position="right",
                    toolbar=None,
                ),
                linked_axes=False,
            ),
            self._listed,
        )
