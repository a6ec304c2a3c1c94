"""Answer view: a generated answer token by token, each token's map on the image and on the text.

The answer is a strip of its tokens, each shaded by the probability the model gave it; a tap
(or the player) chooses generated token k. Its map (a stored relevancy method, or the
attention row of the query that predicted it at the selected layer and head, or the head
mean) is painted on the image and colours the prompt and the earlier answer tokens, and the
step's top-k alternatives are listed with their probabilities. When the store also holds the
full maps (``--rows all``) choosing a token makes its predicting query the selected token, so
the head summary, the attention matrix and the other views show the generated token's rows.
"""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param
import xarray as xr
from bokeh.palettes import Purples256

from vlinterpret_panel.answers import ATTENTION, RELIANCE_PARTS, output_map_choices
from vlinterpret_panel.relevancy.targets import step_title
from vlinterpret_panel.ui.common import NO_SELECTION_FADE, SELECTED_COLOR, dynamic_map, fit_title, guarded
from vlinterpret_panel.ui.image import image_element, image_plot_size, map_element, overlay_element, scale_controls
from vlinterpret_panel.ui.scales import map_scale
from vlinterpret_panel.ui.selection import Selection, batched_widget
from vlinterpret_panel.ui.text import TEXT_WIDTH, coloured_tokens, token_labels, token_layout
from vlinterpret_panel.ui.view import View

STRIP_LINE_WIDTH = 60.0
STRIP_LINE_HEIGHT = 2.0
STRIP_WIDTH = 620
PROBABILITY_PALETTE = list(Purples256[110:250])
"""Mid purple (improbable) to near white (certain): the doubtful tokens stand out, black labels stay readable."""
MEAN_OF_HEADS = "mean"
RELIANCE_COLOURS = {"image": "#1f77b4", "prompt": "#ff7f0e", "answer": "#2ca02c"}


def _token_width(token: str) -> float:
    return max(4.0, len(token) * 1.0 + 1.5)


def _wrapped(tokens: list[str]) -> list[tuple[float, int]]:
    """Each token's (x, line) when the strip wraps at ``STRIP_LINE_WIDTH``."""
    places, x, line = [], 0.0, 0
    for token in tokens:
        width = _token_width(token)
        if x + width > STRIP_LINE_WIDTH and x > 0:
            x, line = 0.0, line + 1
        places.append((x, line))
        x += width + 0.3
    return places


def strip_layout(answer: pd.DataFrame) -> pd.DataFrame:
    """Boxes of the generated tokens in wrapped lines (y grows downwards), one per step."""
    tokens = [str(token) for token in answer["token"]]
    rows = [
        {
            "x0": x,
            "y0": line * STRIP_LINE_HEIGHT,
            "x1": x + _token_width(token),
            "y1": line * STRIP_LINE_HEIGHT + STRIP_LINE_HEIGHT * 0.9,
            "step": int(step),
            "token": token,
            "probability": float(probability),
        }
        for (x, line), token, step, probability in zip(
            _wrapped(tokens), tokens, answer["step"], answer["probability"], strict=True
        )
    ]
    return pd.DataFrame(rows, columns=["x0", "y0", "x1", "y1", "step", "token", "probability"])


def strip_lines(ds: xr.Dataset) -> int:
    """Lines of the longest answer's strip in the store: the strip keeps one height for every example.

    HoloViews sizes a plot by its first frame, so a strip sized per answer would clip a longer
    answer shown later.
    """
    if "answer_token" not in ds:
        return 1
    longest = 1
    for row in ds["answer_token"].values:
        places = _wrapped([str(token) for token in row if str(token)])
        longest = max(longest, places[-1][1] + 1 if places else 1)
    return longest


def step_choices(ds: xr.Dataset, example: str) -> dict[str, int]:
    """The generated tokens of ``example`` as "step: token" options (one "answer" option without generated answers)."""
    if not ds.vli.has_answers:
        return {"answer": 0}
    answer = ds.vli.answer(example)
    return {f"{step}: {token}": int(step) for step, token in zip(answer["step"], answer["token"], strict=True)} or {
        "no answer": 0
    }


def step_chooser(view: param.Parameterized) -> pn.widgets.Select:
    """A Select of ``view.step`` listing the selected example's generated tokens; hidden without generated answers."""
    ds, example = view.ds, view.selection.example  # type: ignore[attr-defined]
    return pn.widgets.Select.from_param(
        view.param.step,
        options=step_choices(ds, example),
        label="generated token",
        width=150,
        visible=bool(ds.vli.has_answers),
    )


ANSWER_URL_PARAMETERS = {"step": "step", "method": "map"}
"""The answer view's state in the page URL (parameter: URL name): the generated token and the map shown."""


class AnswerMapView(View):
    """A view of an output's maps (a generated token's, or a classifier's answer's): ``method`` chooses which."""

    method: str = param.Selector(  # type: ignore[assignment]
        default=ATTENTION, objects=[ATTENTION], doc="what the map shows: a relevancy method or the attention row"
    )

    def offer_maps(self, first: bool) -> None:
        """Offer ``ds``'s maps: generic relevancy when the view opens, else the current choice while still stored."""
        choices = output_map_choices(self.ds) or [ATTENTION]
        self.param.method.objects = choices
        if first or self.method not in choices:
            self.method = "generic" if "generic" in choices else choices[0]


class AnswerView(AnswerMapView):
    """Generated token k of the selected example: its probability, alternatives and maps."""

    step = param.Integer(default=0, bounds=(0, None), doc="the generated token shown (its step in the answer)")

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(ds, selection, **params)
        self.dataset_changed()
        own = hv.streams.Params(self, ["step", "method"])
        self._strip = dynamic_map(self._answer_strip, streams=[own, *self.streams("example")])
        self._strip_labels = dynamic_map(self._strip_text, streams=self.streams("example"))
        map_fields = ("example", "layer", "head", "smooth", "scale", "opacity")
        self._image = dynamic_map(self._on_image, streams=[own, *self.streams(*map_fields)])
        self._text = dynamic_map(self._on_text, streams=[own, *self.streams("example", "layer", "head", "scale")])
        self._reliance = dynamic_map(self._reliance_chart, streams=[own, *self.streams("example", "layer", "head")])
        self.tap = hv.streams.Tap(source=self._strip, x=None, y=None)
        self.tap.add_subscriber(self._tapped)
        self.player = pn.widgets.Player(  # an answer plays once: its loop options were cut off by the strip below
            label="play the answer",
            start=0,
            end=max(1, self._answer_length() - 1),
            value=0,
            interval=900,
            width=300,
            show_loop_controls=False,
        )
        self.param.step.bounds = (0, max(0, self._answer_length() - 1))
        self.player.param.watch(self._played, "value")
        self.param.watch(self._step_changed, "step")
        self.selection.param.watch(self._example_changed, "example")
        self._head = pn.widgets.Select(label="head", options=self._head_options(), width=90)
        self._head.param.watch(self._head_chosen, "value")
        self.selection.param.watch(self._show_head, "head")
        self._show_head()
        self._alternatives_table = pn.pane.DataFrame(
            self._alternatives(self.selection.example, self.step), index=False, width=260, sizing_mode="fixed"
        )
        self.param.watch(self._show_alternatives, "step")
        self.selection.param.watch(self._show_alternatives, "example")

    # State

    def dataset_changed(self) -> None:
        """The methods this store offers (the attention row first when it is stored); generic relevancy first shown."""
        self.offer_maps(first=not hasattr(self, "_head"))  # first: called from the constructor
        self._strip_lines = strip_lines(self.ds)
        if hasattr(self, "_head"):
            self._head.options = self._head_options()

    def _head_options(self) -> list[str]:
        return [MEAN_OF_HEADS, *map(str, range(self.ds.sizes.get("head", 1)))]

    def _head_chosen(self, event: param.parameterized.Event) -> None:
        head = None if event.new == MEAN_OF_HEADS else int(event.new)
        if self.selection.head != head:
            self.selection.head = head

    def _show_head(self, *events: param.parameterized.Event) -> None:
        self._head.value = MEAN_OF_HEADS if self.selection.head is None else str(self.selection.head)

    def _answer(self, example: str | None = None) -> pd.DataFrame:
        return self.ds.vli.answer(example if example is not None else self.selection.example)

    def _answer_length(self) -> int:
        if self.selection.example is None or not self.ds.vli.has_answers:
            return 0
        return len(self._answer())

    def _example_changed(self, event: param.parameterized.Event) -> None:
        self.step = 0
        self.param.step.bounds = (0, max(0, self._answer_length() - 1))
        self.player.end = max(1, self._answer_length() - 1)
        self.player.value = 0
        self._follow(0)

    def _played(self, event: param.parameterized.Event) -> None:
        if int(event.new) < self._answer_length():
            self.step = int(event.new)

    def _step_changed(self, event: param.parameterized.Event) -> None:
        if self.player.value != event.new:
            self.player.value = event.new
        self._follow(int(event.new))

    def _follow(self, step: int) -> None:
        """With full maps stored, make generated token ``step``'s predicting query the selected token."""
        if "attention" not in self.ds or not self.ds.vli.has_answers:
            return
        answer = self._answer()
        if step >= len(answer):
            return
        query = int(answer["position"].iloc[step]) - 1
        if self.selection.tokens != [query]:
            self.selection.tokens = [query]

    def _tapped(self, x: float | None, y: float | None) -> None:
        if x is None or y is None:
            return
        boxes = strip_layout(self._answer())
        hit = boxes[(boxes.x0 <= x) & (x <= boxes.x1) & (boxes.y0 <= y) & (y <= boxes.y1)]
        if len(hit):
            self.step = int(hit["step"].iloc[0])

    # Plots

    @staticmethod
    def _map_name(method: str, layer: int, head: int | None) -> str:
        if method != ATTENTION:
            return method
        return f"attention L{layer} {'mean' if head is None else f'h{head}'}"

    def _answer_strip(self, example: str, step: int, method: str, ds: xr.Dataset) -> hv.Rectangles:
        boxes = strip_layout(ds.vli.answer(example)).assign(selected=lambda table: (table["step"] == step).astype(int))
        lines = self._strip_lines
        return hv.Rectangles(boxes, ["x0", "y0", "x1", "y1"], ["step", "token", "probability", "selected"]).opts(
            color="probability",
            cmap=PROBABILITY_PALETTE,
            clim=(0.0, 1.0),
            line_color=hv.dim("selected").categorize({1: SELECTED_COLOR, 0: "#666"}),
            line_width=hv.dim("selected") * 3 + 1,
            invert_yaxis=True,
            xaxis=None,
            yaxis=None,
            width=STRIP_WIDTH + 60,  # the whole figure: a frame width left its right end clipped
            height=34 * lines + 50,
            xlim=(0, STRIP_LINE_WIDTH),
            ylim=(0, lines * STRIP_LINE_HEIGHT),
            tools=["hover"],
            hover_tooltips=[("token", "@token"), ("probability", "@probability{0.0000}"), ("step", "@step")],
            toolbar=None,
            title=f"generated answer: token {step} selected (tap a token or press play)",
            **NO_SELECTION_FADE,
        )

    def _strip_text(self, example: str, ds: xr.Dataset) -> hv.Overlay:
        boxes = strip_layout(ds.vli.answer(example))
        centre_x = (boxes["x0"] + boxes["x1"]) / 2
        words = pd.DataFrame({"x": centre_x, "y": boxes["y0"] + STRIP_LINE_HEIGHT * 0.3, "text": boxes["token"]})
        shares = pd.DataFrame(
            {
                "x": centre_x,
                "y": boxes["y0"] + STRIP_LINE_HEIGHT * 0.68,
                "text": [f"{p:.2f}" if np.isfinite(p) else "" for p in boxes["probability"]],
            }
        )
        axes = {"xaxis": None, "yaxis": None}  # the strip has none: an axis here would widen the figure's border
        words_element = hv.Labels(words, ["x", "y"], "text").opts(text_font_size="10pt", text_color="black", **axes)
        shares_element = hv.Labels(shares, ["x", "y"], "text").opts(text_font_size="8pt", text_color="#222", **axes)
        return words_element * shares_element

    def _empty_image(self, message: str) -> hv.Overlay:
        blank = np.zeros((1, 1, 3), dtype=np.uint8)
        return image_element(blank).opts(title=message[:80]) * map_element(np.full((1, 1), np.nan), "map")

    def _on_image(
        self,
        example: str,
        step: int,
        method: str,
        layer: int,
        head: int | None,
        smooth: bool,
        scale: str,
        opacity: float,
        ds: xr.Dataset,
    ) -> hv.Overlay:
        @guarded(self.selection, self._empty_image)
        def draw() -> hv.Overlay:
            tokens = ds.vli.tokens(example)
            answer = ds.vli.answer(example)
            values = ds.vli.answer_map(example, step, method, layer, head)
            image_tokens = tokens.image_tokens()
            colour_range = map_scale(values[image_tokens], "per map" if scale == "shared" else scale)
            painted = ds.vli.values_on_image(example, values, smooth=smooth).values
            size = image_plot_size(tokens.image)
            picture = image_element(tokens.image).opts(invert_yaxis=True, xaxis=None, yaxis=None, **size)
            token = answer["token"].iloc[step] if step < len(answer) else "?"
            if method == ATTENTION:
                title = f"{token!r}: {self._map_name(method, layer, head)}"
            else:
                alternatives = ds.vli.alternatives(example, step)["token"] if step < len(answer) else []
                title = step_title(method, token, list(alternatives))
            title += ": all 0 on the image" if colour_range.all_zero else ""
            heat = overlay_element(painted, colour_range, "map", opacity)
            return (picture * heat).opts(title=fit_title(title, size["frame_width"]))

        return draw()

    def _empty_text(self, message: str) -> hv.Overlay:
        info = self.ds.vli.tokens(self.selection.example)
        layout = token_layout(info)
        return coloured_tokens(layout, np.zeros(info.n_tokens), "", message) * token_labels(layout)

    def _on_text(
        self, example: str, step: int, method: str, layer: int, head: int | None, scale: str, ds: xr.Dataset
    ) -> hv.Overlay:
        @guarded(self.selection, self._empty_text)
        def draw() -> hv.Overlay:
            answer = ds.vli.answer(example)
            values = ds.vli.answer_map(example, step, method, layer, head)
            layout = token_layout(ds.vli.tokens(example))
            position = int(answer["position"].iloc[step]) if step < len(answer) else -1
            token = answer["token"].iloc[step] if step < len(answer) else "?"
            title = fit_title(f"prompt, answer so far: {token!r}", TEXT_WIDTH)
            return coloured_tokens(layout, values, "map", title, selected=[position], scale=scale) * token_labels(
                layout
            )

        return draw()

    def _reliance_chart(
        self, example: str, step: int, method: str, layer: int, head: int | None, ds: xr.Dataset
    ) -> hv.Bars:
        @guarded(self.selection, lambda message: hv.Bars([]).opts(title=message[:80]))
        def draw() -> hv.Bars:
            answer = ds.vli.answer(example)
            shares = ds.vli.reliance(example, method, layer, head)
            labels = [f"{k}:{token}" for k, token in zip(answer["step"], answer["token"], strict=True)]
            table = (
                shares.assign(token=labels)
                .melt(id_vars="token", value_vars=list(RELIANCE_PARTS), var_name="part", value_name="share")
                .fillna(0.0)
            )
            name = self._map_name(method, layer, head)
            return hv.Bars(table, ["token", "part"], "share").opts(
                stacked=True,
                cmap=RELIANCE_COLOURS,
                ylim=(0, 1),
                xrotation=60,
                frame_width=STRIP_WIDTH,
                frame_height=150,
                legend_position="right",
                tools=["hover"],
                toolbar=None,
                xlabel="",
                ylabel="share of the map",
                title=fit_title(f"where each token's {name} lies (token {step}: {labels[step]})", STRIP_WIDTH),
            )

        return draw()

    def _alternatives(self, example: str | None, step: int) -> pd.DataFrame:
        if example is None or not self.ds.vli.has_answers:
            return pd.DataFrame()
        table = self.ds.vli.alternatives(example, step)
        return table.assign(probability=table["probability"].round(4))

    def _show_alternatives(self, *events: param.parameterized.Event) -> None:
        """Refill the one alternatives table in place (a pane re-created per click would flash a loading state)."""
        self._alternatives_table.object = self._alternatives(self.selection.example, self.step)

    def __panel__(self) -> pn.viewable.Viewable:
        if not self.ds.vli.has_answers:
            return pn.pane.Markdown(
                "This store has no generated answers: extract with `--generate` to see them here.", width=STRIP_WIDTH
            )
        method = pn.widgets.Select.from_param(self.param.method, label="map", width=250)
        layers = self.ds.sizes.get("layer", 1)
        layer = batched_widget(
            pn.widgets.IntSlider, self.selection, "layer", start=0, end=max(1, layers - 1), label="layer", width=160
        )
        return pn.Column(
            pn.Row(self.player, method, layer, self._head, *scale_controls(self.selection)),
            pn.pane.HoloViews(self._strip * self._strip_labels, linked_axes=False),
            pn.Row(
                pn.pane.HoloViews(self._image, linked_axes=False),
                pn.pane.HoloViews(self._text, linked_axes=False),
                pn.Column(pn.pane.Markdown("**top alternatives at this step**"), self._alternatives_table),
            ),
            pn.pane.HoloViews(self._reliance, linked_axes=False),
        )
