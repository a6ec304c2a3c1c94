"""Counterfactual view: edit an example (mask a region, change the question), rerun, compare side by side.

With a live model (``vlinterpret serve STORE --model NAME``) the editor draws a box (box
select) or brush strokes (freehand draw) on the selected example's image, previews the
masked image with the chosen fill, and "Run edit" stores the result as a new example linked
to the original (``LiveModel.add_counterfactual``), which the dashboard then selects. Without
a model it shows the store's counterfactuals. The comparison shows the original and the
edited example with their maps on one colour scale, the difference map (edited minus
original) and the answers token by token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param
import xarray as xr

from vlinterpret_panel import counterfactual
from vlinterpret_panel.counterfactual import FILLS, Edit
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.live import AddedExample, LiveModel
from vlinterpret_panel.ui.answer import AnswerMapView, step_choices, step_chooser
from vlinterpret_panel.ui.common import SELECTED_COLOR, dynamic_map, fit_title, guarded
from vlinterpret_panel.ui.image import difference_overlay, image_element, image_plot_size, map_element, overlay_element
from vlinterpret_panel.ui.scales import colorbar_options, map_scale
from vlinterpret_panel.ui.selection import Selection

logger = logging.getLogger(__name__)

EDITOR_SIZE = 260
COMPARE_SIZE = 240
NO_PAIR = "no counterfactual to compare"
# What the comparison's plots show: the selected example, the counterfactual compared, the map, the step, the opacity.
PairState = hv.streams.Stream.define("PairState", example="", edited="", method="", step=0, opacity=0.0)
TABLE_COLUMNS = {
    "token_original": "original",
    "probability_original": "p original",
    "token_edited": "edited",
    "probability_edited": "p edited",
}


class CounterfactualView(AnswerMapView):
    """The editor (with a live model) and the side-by-side comparison of an original and its edit."""

    fill: str = param.Selector(default="background", objects=list(FILLS), doc="what a masked region becomes")  # type: ignore[assignment]
    brush_width = param.Number(default=8.0, bounds=(1, 64), doc="brush width in image pixels")
    step = param.Integer(default=0, bounds=(0, None), doc="the generated token whose maps are compared")
    edited: str = param.Selector(default="", objects=[""], doc="the counterfactual compared with the original")  # type: ignore[assignment]

    def __init__(
        self,
        ds: xr.Dataset,
        selection: Selection | None = None,
        *,
        live: LiveModel | None = None,
        store: Path | None = None,
        on_added: Callable[[AddedExample], None] | None = None,
        **params,
    ) -> None:
        super().__init__(ds, selection, **params)
        self.live, self.store, self._on_added = live, store, on_added
        self.running = False  # an edit of this session is in the model thread
        self._last_maps: tuple[object, tuple[np.ndarray, ...]] = (None, ())
        self.dataset_changed()
        self.selection.param.watch(self._example_changed, "example")
        self._example_changed()
        # Editor: a plain RGB element is the source of the box (a stream on an overlay gets no events).
        # The plots read ``self.ds`` but do not redraw when the store grows: the shown examples do not change.
        example = hv.streams.Params(self.selection, ["example"])
        self._picture = dynamic_map(self._editor_image, streams=[example])
        self.bounds = hv.streams.BoundsXY(source=self._picture, bounds=None)
        # The strokes' source is redrawn empty by "Clear" (a stream's new data alone leaves the drawn lines).
        self._cleared = hv.streams.Counter()
        self._strokes = hv.DynamicMap(
            lambda counter: hv.Path([]).opts(color=SELECTED_COLOR, line_width=2, alpha=0.8), streams=[self._cleared]
        )
        self.brush = hv.streams.FreehandDraw(source=self._strokes, num_objects=8)
        edit_streams = [self.bounds, self.brush, hv.streams.Params(self, ["fill", "brush_width"])]
        self._preview = dynamic_map(self._preview_image, streams=[example, *edit_streams])
        self._region = dynamic_map(self._masked_region, streams=[example, *edit_streams])
        self.question = pn.widgets.TextInput(label="question (edit to ask another)", width=EDITOR_SIZE - 30)
        self.run_button = pn.widgets.Button(label="Run edit", color="primary", width=120)
        self.clear_button = pn.widgets.Button(label="Clear", width=80)
        self.run_button.on_click(self._run)
        self.clear_button.on_click(self.clear)
        self.status = pn.pane.Alert("", alert_type="info", visible=False, width=EDITOR_SIZE - 40)
        # Comparison: one stream, triggered once per change of what is compared (a new pair also moves to the
        # first step it changed: with the params as streams, the three plots were drawn twice).
        self._pair_state = PairState(**self._pair_values())
        self._pair_changing = False
        self._original = dynamic_map(self._side("original"), streams=[self._pair_state])
        self._edited = dynamic_map(self._side("edited"), streams=[self._pair_state])
        self._difference = dynamic_map(self._difference_map, streams=[self._pair_state])
        self.param.watch(self._redraw_pair, ["method", "step"])
        self.selection.param.watch(self._redraw_pair, ["opacity"])
        self._table = pn.pane.DataFrame(pd.DataFrame(), index=False, width=560, max_height=250, sizing_mode="fixed")
        self._caption = pn.pane.Markdown("", width=560)
        self._step_choice = step_chooser(self)
        self.param.watch(self._show_pair, ["edited"])
        self._show_pair()
        self._set_question()

    # State

    def dataset_changed(self) -> None:
        """The maps this store offers; the counterfactuals of the selected example (the one compared kept)."""
        self.offer_maps(first=not hasattr(self, "_step_choice"))  # generic relevancy when the view opens
        self.param.edited.objects = ["", *self.ds.vli.counterfactuals(self.original())]

    def show_edit(self, ds: xr.Dataset, edited: str) -> None:
        """Show the grown store ``ds`` comparing the selected example with its new counterfactual ``edited``.

        The drawn edit stays until ``clear`` (the caller clears it once the comparison is on the page)."""
        self.ds = ds
        self.edited = edited

    def original(self) -> str:
        """The original of the selected example (itself when it is not a counterfactual)."""
        origin = self.ds.vli.origin(self.selection.example)
        return origin if origin is not None and origin in self.ds.indexes["example"] else self.selection.example

    def pair(self) -> tuple[str, str] | None:
        """(original, edited) compared: the selected example's original and the chosen one of its counterfactuals."""
        return (self.original(), self.edited) if self.edited else None

    def _example_changed(self, *events: param.parameterized.Event) -> None:
        example = self.selection.example
        edits = self.ds.vli.counterfactuals(self.original())
        self.param.edited.objects = ["", *edits]
        edited = example if example in edits else (edits[-1] if edits else "")
        changed = edited != self.edited
        self.edited = edited  # a change shows the new pair through its watcher
        if hasattr(self, "_step_choice"):
            self.clear()
            self._set_question()
            if not changed:
                self._show_pair()

    def _pair_values(self) -> dict[str, object]:
        return {
            "example": self.selection.example,
            "edited": self.edited,
            "method": self.method,
            "step": self.step,
            "opacity": self.selection.opacity,
        }

    def _redraw_pair(self, *events: param.parameterized.Event) -> None:
        if not self._pair_changing and hasattr(self, "_pair_state"):
            self._pair_state.event(**self._pair_values())

    def _show_pair(self, *events: param.parameterized.Event) -> None:
        """The pair's caption, table and steps, at the first step the edit changed; the plots drawn once."""
        self._pair_changing = True
        try:
            self._describe_pair()
        finally:
            self._pair_changing = False
        self._redraw_pair()

    def _describe_pair(self) -> None:
        """The pair's caption and table, its steps ("original → edited" tokens), the first step the edit changed."""
        pair = self.pair()
        if pair is None:
            self._table.object = pd.DataFrame()
            how = "Draw a box or brush on its image (or edit the question) and press **Run edit**."
            self._caption.object = "No counterfactual of this example yet. " + (how if self.live else "")
            self._step_choice.options = step_choices(self.ds, self.original())
            self.step = 0
            return
        table = counterfactual.compare(self.ds, *pair)
        self._table.object = table.round(4).rename(columns=TABLE_COLUMNS)
        edit = self.ds.vli.edit(pair[1])
        self._caption.object = f"**{pair[0]}** → **{pair[1]}**" + (f": {edit.describe()}" if edit is not None else "")
        if not self.ds.vli.has_answers:
            self._step_choice.options = step_choices(self.ds, self.original())
            self.step = 0
            return
        self._step_choice.options = {
            f"{step}: {before} → {after}": int(step)
            for step, before, after in zip(table["step"], table["token_original"], table["token_edited"], strict=True)
        }
        differs = table.index[table["token_original"] != table["token_edited"]]
        self.step = int(table["step"].iloc[differs[0]]) if len(differs) else 0

    def _set_question(self) -> None:
        self.question.value = self.ds.vli.tokens(self.selection.example).text

    def clear(self, event: object = None) -> None:
        """Forget the drawn box and strokes."""
        if self.bounds.bounds is None and not (self.brush.data or {}).get("xs"):
            return
        self.bounds.update(bounds=None)
        self.brush.update(data={"xs": [], "ys": []})
        self._cleared.update(counter=self._cleared.counter + 1)
        hv.streams.Stream.trigger([self.bounds, self.brush, self._cleared])  # one redraw, not three

    def current_edit(self) -> Edit:
        """The edit drawn and typed so far (box from the box select, strokes from the brush)."""
        box = None
        if self.bounds.bounds is not None:
            x0, y0, x1, y1 = self.bounds.bounds
            top, bottom = sorted((y0, y1))
            box = (int(np.floor(x0)), int(np.floor(top)), int(np.ceil(x1)), int(np.ceil(bottom)))
        data = self.brush.data or {}
        strokes = tuple(
            tuple(zip(map(float, xs), map(float, ys), strict=True))
            for xs, ys in zip(data.get("xs", []), data.get("ys", []), strict=False)
            if len(xs)
        )
        text = (self.question.value or "").strip()
        original = self.ds.vli.tokens(self.selection.example).text
        question = text if text and text != original else None
        return Edit(box=box, strokes=strokes, brush_width=self.brush_width, fill=self.fill, question=question)  # type: ignore[arg-type]

    # Editor

    def _editor_image(self, example: str) -> hv.RGB:
        tokens = self.ds.vli.tokens(example)
        size = image_plot_size(tokens.image, EDITOR_SIZE)
        return image_element(tokens.image).opts(
            invert_yaxis=True,
            title=fit_title(f"draw on {example}: box, or brush", size["frame_width"]),
            tools=["box_select"],
            active_tools=["box_select"],
            xaxis=None,
            yaxis=None,
            **size,
        )

    def _preview_image(self, example: str, bounds: object, data: object, fill: str, brush_width: float) -> hv.RGB:
        tokens = self.ds.vli.tokens(example)
        size = image_plot_size(tokens.image, EDITOR_SIZE // 2)
        try:
            edited = self.current_edit().apply(tokens.image)
        except VLIError as error:
            self.selection.message = str(error)
            edited = tokens.image
        return image_element(edited).opts(invert_yaxis=True, title="edited image", xaxis=None, yaxis=None, **size)

    def _masked_region(self, example: str, bounds: object, data: object, fill: str, brush_width: float) -> hv.Image:
        """The pixels the edit masks, veiled in white on the editor (the brush's true width, not the line's)."""
        height, width = self.ds.vli.tokens(example).image.shape[:2]
        try:
            region = self.current_edit().region(height, width)
        except VLIError:
            region = np.zeros((height, width), dtype=bool)
        return map_element(np.where(region, 1.0, np.nan), "masked").opts(
            cmap=["#ffffff"], alpha=0.55, clim=(0, 1), colorbar=False, invert_yaxis=True, tools=[]
        )

    def run_edit(self) -> AddedExample:
        """Store the current edit of the selected example as a counterfactual (blocking)."""
        if self.live is None or self.store is None:
            raise VLIError("serve the store with --model to run edits")
        return self.live.add_counterfactual(self.store, self.selection.example, self.current_edit(), opened=self.ds)

    async def _run(self, event: object = None) -> None:
        from vlinterpret_panel.ui.add_example import MODEL_THREAD

        # The status line says the model runs; no animated progress bar: drawn by a browser without a GPU on the
        # server's two cores, it took 0.1-0.25 s off the model run's CPU (rerun p50 0.79-0.95 s -> 0.67-0.69 s).
        self.running = True
        self.run_button.disabled = True
        self.status.param.update(object="running the model on the edited example…", alert_type="info", visible=True)
        try:
            added = await asyncio.get_running_loop().run_in_executor(MODEL_THREAD, self.run_edit)
        except VLIError as error:
            self.status.param.update(object=str(error), alert_type="danger")
            return
        except Exception as error:  # the server keeps serving; the user gets one line, the log the traceback
            logger.exception("counterfactual failed")
            self.status.param.update(object=f"the edit failed: {type(error).__name__}: {error}", alert_type="danger")
            return
        finally:
            self.running = False
            self.run_button.disabled = False
        prediction = f": {added.prediction}" if added.prediction is not None else ""
        self.status.param.update(object=f"added {added.example_id}{prediction}", alert_type="success")
        if self._on_added is not None:
            self._on_added(added)

    # Comparison

    def _empty(self, message: str) -> hv.Overlay:
        """The selected example's original image without a map, titled ``message`` (same frame as a pair's)."""
        tokens = self.ds.vli.tokens(self.original())
        size = image_plot_size(tokens.image, COMPARE_SIZE)
        picture = image_element(tokens.image).opts(invert_yaxis=True, xaxis=None, yaxis=None, framewise=True, **size)
        # With a colorbar: HoloViews keeps the first frame's, so a frame without one would leave the pair's without.
        blank = map_element(np.full(tokens.image.shape[:2], np.nan), "map").opts(
            invert_yaxis=True, clim=(0.0, 1.0), clabel="no map", **colorbar_options()
        )
        return (picture * blank).opts(title=fit_title(message, size["frame_width"] + 60))

    def _maps(self, ds: xr.Dataset, pair: tuple[str, str], method: str, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The pair's maps, computed once for the three plots that draw them."""
        key = (id(ds), pair, method, step)
        if self._last_maps[0] != key:
            self._last_maps = (key, tuple(counterfactual.image_map(ds, e, method, step) for e in pair))
        return self._last_maps[1]  # type: ignore[return-value]

    def _outcome(self, ds: xr.Dataset, example: str, step: int) -> str:
        table = counterfactual.outcome(ds, example)
        if not len(table):
            return "no output"
        row = table.iloc[min(step, len(table) - 1)]
        answer = " ".join(str(t) for t in table["token"]) if ds.vli.has_answers else str(row["token"])
        return f"{answer[:40]} · p({row['token']!s}) = {row['probability']:.3f}"

    def _side(self, which: str) -> Callable[..., hv.Overlay]:
        def draw(example: str, edited: str, method: str, step: int, opacity: float) -> hv.Overlay:
            ds = self.ds

            @guarded(self.selection, self._empty)
            def paint() -> hv.Overlay:
                pair = self.pair()
                if pair is None:
                    return self._empty(NO_PAIR)
                shown = pair[0] if which == "original" else pair[1]
                values = self._maps(ds, pair, method, step)
                own = values[0] if which == "original" else values[1]
                scale = map_scale(own, "shared", shared_with=values)
                tokens = ds.vli.tokens(shown)
                size = image_plot_size(tokens.image, COMPARE_SIZE)
                picture = image_element(tokens.image).opts(
                    invert_yaxis=True, xaxis=None, yaxis=None, framewise=True, **size
                )
                title = fit_title(f"{which}: {self._outcome(ds, shown, step)}", size["frame_width"] + 60)
                return (picture * overlay_element(own, scale, method, opacity)).opts(title=title)

            return paint()

        return draw

    def _difference_map(self, example: str, edited: str, method: str, step: int, opacity: float) -> hv.Overlay:
        ds = self.ds

        @guarded(self.selection, self._empty)
        def paint() -> hv.Overlay:
            pair = self.pair()
            if pair is None:
                return self._empty(NO_PAIR)
            before, after = self._maps(ds, pair, method, step)
            difference = after - before
            top = float(np.abs(difference).max())
            tokens = ds.vli.tokens(pair[1])
            size = image_plot_size(tokens.image, COMPARE_SIZE)
            label = f"edited − original ({method}, ±{top:.3g})" if top > 0 else "no difference"
            return difference_overlay(tokens.image, difference, label, size)

        return paint()

    def __panel__(self) -> pn.viewable.Viewable:
        choices = pn.Row(
            pn.widgets.Select.from_param(self.param.edited, label="compare with", width=260),
            pn.widgets.Select.from_param(self.param.method, label="map", width=150),
            self._step_choice,
        )
        maps = pn.Row(
            pn.pane.HoloViews(self._original, linked_axes=False),
            pn.pane.HoloViews(self._edited, linked_axes=False),
            pn.pane.HoloViews(self._difference, linked_axes=False),
        )
        table = pn.Column(choices, self._caption, self._table)
        if self.live is None:
            return pn.Column(table, maps)
        editor = pn.Row(
            pn.pane.HoloViews(self._picture * self._region * self._strokes, linked_axes=False),
            pn.Column(
                pn.pane.HoloViews(self._preview, linked_axes=False),
                pn.widgets.RadioButtonGroup.from_param(self.param.fill, width=220),
                pn.widgets.FloatSlider.from_param(self.param.brush_width, label="brush width (pixels)", width=200),
                self.question,
                pn.Row(self.run_button, self.clear_button),
                self.status,
                width=EDITOR_SIZE - 20,
            ),
        )
        return pn.Column(pn.Row(editor, table), maps)
