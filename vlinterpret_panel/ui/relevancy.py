"""Relevancy view: a method and its target, image and text relevancy side by side, all methods compared.

The example's top answers are listed with their probabilities; picking one explains it, and "against" a second
answer explains the contrast (``relevancy.chosen``: read when the store holds that map, else computed with the
served model). The row of targets shows the two answers' maps and their difference.
"""

from __future__ import annotations

from typing import Any

import holoviews as hv
import numpy as np
import panel as pn
import xarray as xr

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.live import LiveModel
from vlinterpret_panel.relevancy.capture import depends_on_target
from vlinterpret_panel.relevancy.chosen import (
    STORED,
    ChosenRelevancy,
    ChosenRelevancyReader,
    answer_choices,
    caption_choices,
    scores_captions,
    store_captions,
    stored_targets,
)
from vlinterpret_panel.relevancy.targets import CAPTION, CAPTION_CONTRAST, split_entry
from vlinterpret_panel.ui.common import IMAGE_SIZE, dynamic_map, fit_title, guarded, heading
from vlinterpret_panel.ui.image import (
    difference_overlay,
    image_element,
    image_plot_size,
    map_element,
    overlay_element,
    scale_controls,
)
from vlinterpret_panel.ui.scales import map_scale
from vlinterpret_panel.ui.selection import Selection
from vlinterpret_panel.ui.text import coloured_tokens, token_labels, token_layout
from vlinterpret_panel.ui.view import View

COMPARISON_SIZE = 180
TARGET_COLOR = "#7CFC00"


def relevancy_scale(scale: str) -> str:
    """Relevancy has no fixed range (its units depend on the method): ``fixed`` shows each map on its own."""
    return "per map" if scale == "fixed" else scale


def target_outline(ds: xr.Dataset, example: str) -> hv.Path:
    """The outline of the example's ground-truth target mask (empty when the store has none, or it is empty)."""
    if "target_mask" not in ds:
        return hv.Path([])
    import contourpy

    info = ds.vli.tokens(example)
    height, width = info.image.shape[:2]
    mask = ds["target_mask"].isel(example=info.index, image_y=slice(0, height), image_x=slice(0, width)).values
    if not mask.any():
        return hv.Path([])
    padded = np.pad(mask.astype(np.float64), 1)  # closes outlines that touch the image's edge
    lines = contourpy.contour_generator(z=padded).lines(0.5)
    return hv.Path([np.asarray(line) - 0.5 for line in lines]).opts(
        color=TARGET_COLOR, line_width=2, line_dash="dashed"
    )


class RelevancyView(View):
    """What the output depends on, by the relevancy methods stored with the examples, for any answer."""

    def __init__(
        self, ds: xr.Dataset, selection: Selection | None = None, *, live: LiveModel | None = None, **params
    ) -> None:
        super().__init__(ds, selection, **params)
        adapter = live.adapter if live is not None else None
        self.reader = ChosenRelevancyReader(adapter, lock=live.lock if live is not None else None)
        self._choices: dict[str, list[tuple[str, float]]] = {}
        self._captions = scores_captions(ds)  # a dual encoder: one score, contrasted with other captions
        self._store_captions: list[str] | None = None
        chosen = ("relevancy_answer", "relevancy_versus")
        image_fields = ("example", "relevancy_method", *chosen, "smooth", "scale", "opacity")
        self._image = dynamic_map(self._on_image, streams=self.streams(*image_fields))
        self._text = dynamic_map(self._on_text, streams=self.streams("example", "relevancy_method", *chosen))
        self._all_methods = dynamic_map(self._comparison, streams=self.streams("example", "smooth", "scale", "opacity"))
        self._answer = pn.widgets.RadioBoxGroup(label="answer", options={}, inline=False, width=160)
        self._versus = pn.widgets.Select(label="against", options={}, width=160)
        self._answer.visible = not self._captions  # a dual encoder explains its own caption's score
        self._answer.param.watch(self._answer_picked, "value")
        self._versus.param.watch(self._versus_picked, "value")
        self.selection.param.watch(self._example_changed, "example")
        self._example_changed()

    @property
    def methods(self) -> list[str]:
        """The relevancy methods the store holds (a method stored for several targets is listed once)."""
        return list(dict.fromkeys(split_entry(entry)[0] for entry in self.ds.vli.relevancy_methods))

    def choices(self, example: str) -> list[tuple[str, float]]:
        """The answers offered for ``example``, most probable first (``relevancy.chosen.answer_choices``; kept
        per example: without stored ``top_answer`` they come from a model run)."""
        if example not in self._choices:
            try:
                if self._captions:
                    if self._store_captions is None:  # read once per store, not per example
                        self._store_captions = store_captions(self.ds)
                    offered = caption_choices(self.ds, example, self.reader.adapter, self._store_captions)
                else:
                    offered = answer_choices(self.ds, example, self.reader.adapter)
                self._choices[example] = offered
            except VLIError:
                return []
        return self._choices[example]

    def dataset_changed(self) -> None:
        self._choices.clear()
        self._store_captions = None

    def answer_or_prediction(self, example: str, answer: str) -> str:
        """``answer``, or the example's prediction (its first choice) when none was picked (""); a dual encoder's is its
        own caption."""
        if self._captions:
            return CAPTION
        if answer:
            return answer
        choices = self.choices(example)
        if not choices:
            raise VLIError("this example has no answers to explain")
        return choices[0][0]

    def _example_changed(self, *events: object) -> None:
        """A new example: its answers in the list, the prediction picked, no contrast."""
        choices = self.choices(self.selection.example)
        label = _caption_label if self._captions else _choice_label
        labels = {label(name, value): name for name, value in choices}
        self.selection.param.update(relevancy_answer="", relevancy_versus="")
        self._answer.options = {} if self._captions else labels
        self._answer.value = choices[0][0] if choices and not self._captions else None
        self._versus.options = {"none": "", **labels}
        self._versus.value = ""

    def _answer_note(self, method: str) -> str:
        """What picking an answer does with the method shown."""
        if _explains_answers(method) and self._captions:
            ranked = " (ranked by the model's score with this image, best first)" if self.reader.adapter else ""
            return (
                f"{method} explains this caption's score; 'against' another caption{ranked} explains why this one "
                "and not that: on the image, the difference of the two scores; on the text, this caption's own. "
                "A contrast the store does not hold is computed with the model."
            )
        if _explains_answers(method):
            computed = " A map the store does not hold is computed with the model." if self.reader.adapter else ""
            return f"{method} explains the picked answer; 'against' explains why it and not the other.{computed}"
        return f"{method} reads attention only: the same for every answer. Pick a gradient method to explain one."

    def _versus_note(self, versus: str, method: str) -> str:
        """The caption picked as 'against', in full, and where its map comes from (the list and the map's title cut
        them short)."""
        if not (self._captions and versus and _explains_answers(method)):
            return ""
        wanted = f"{CAPTION_CONTRAST}{versus}"
        source = "stored" if stored_targets(self.ds, self.selection.example, method).get(wanted) else "computed"
        return f"*against:* {versus} (map {source})"

    def _answer_picked(self, event: object) -> None:
        choices = self.choices(self.selection.example)
        predicted = choices[0][0] if choices else ""
        answer = "" if self._answer.value in (None, predicted) else str(self._answer.value)
        versus = self.selection.relevancy_versus
        self.selection.param.update(relevancy_answer=answer, relevancy_versus="" if versus == answer else versus)

    def _versus_picked(self, event: object) -> None:
        versus = str(self._versus.value or "")
        answer = self.answer_or_prediction(self.selection.example, self.selection.relevancy_answer) if versus else ""
        self.selection.relevancy_versus = "" if versus == answer else versus

    def chosen(self, ds: xr.Dataset, example: str, method: str, answer: str, versus: str) -> ChosenRelevancy | None:
        """The map of the picked answer (and contrast), or None for the stored map of the prediction (also for a
        method that reads attention only: its map is the same for every answer)."""
        if (not answer and not versus) or not _explains_answers(method):
            return None
        return self.reader.relevancy(ds, example, method, self.answer_or_prediction(example, answer), versus)

    def _empty_image(self, message: str) -> hv.Overlay:
        blank = np.zeros((1, 1, 3), dtype=np.uint8)
        return image_element(blank).opts(title=message[:80]) * map_element(np.full((1, 1), np.nan), "relevancy")

    @staticmethod
    def _image_with(
        ds: xr.Dataset,
        example: str,
        method: str,
        smooth: bool,
        scale: str,
        opacity: float,
        size: dict[str, int] | None = None,
    ) -> hv.Overlay:
        """The stored map of ``method`` (its prediction entry), on a scale shared with the other methods' maps."""
        relevancy = ds.vli.relevancy(example, method)
        target = relevancy.attrs["target"]
        others = tuple(ds.vli.relevancy(example, m).values for m in _prediction_entries(ds))
        title = f"{method} → {target}" if target else method
        return _map_on_image(ds, example, relevancy.values, title, smooth, scale, opacity, size, others)

    @staticmethod
    def _chosen_image(
        ds: xr.Dataset,
        example: str,
        method: str,
        chosen: ChosenRelevancy,
        smooth: bool,
        scale: str,
        opacity: float,
        size: dict[str, int] | None = None,
        shared_with: tuple[np.ndarray, ...] = (),
    ) -> hv.Overlay:
        """A picked answer's map, on its own scale or shared with the maps beside it."""
        source = "" if chosen.source == STORED else " (computed)"
        target = chosen.target
        if target.startswith(CAPTION_CONTRAST):  # the other caption and the source are named beside its picker
            target, source = "this − other", ""
        title = f"{method} → {target}{source}"
        return _map_on_image(ds, example, chosen.values, title, smooth, scale, opacity, size, shared_with)

    def _on_image(
        self,
        example: str,
        relevancy_method: str,
        relevancy_answer: str,
        relevancy_versus: str,
        smooth: bool,
        scale: str,
        opacity: float,
        ds: xr.Dataset,
    ) -> hv.Overlay:
        @guarded(self.selection, self._empty_image)
        def draw() -> hv.Overlay:
            chosen = self.chosen(ds, example, relevancy_method, relevancy_answer, relevancy_versus)
            if chosen is None:
                return self._image_with(ds, example, relevancy_method, smooth, scale, opacity)
            return self._chosen_image(ds, example, relevancy_method, chosen, smooth, scale, opacity)

        return draw()

    def _empty_text(self, message: str) -> hv.Overlay:
        info = self.ds.vli.tokens(self.selection.example)
        layout = token_layout(info)
        return coloured_tokens(layout, np.zeros(info.n_tokens), "", message) * token_labels(layout)

    def _text_with(self, ds: xr.Dataset, example: str, method: str, answer: str, versus: str) -> hv.Overlay:
        chosen = self.chosen(ds, example, method, answer, versus)
        if chosen is None:
            relevancy = ds.vli.relevancy(example, method)
            values, target = relevancy.values, relevancy.attrs["target"]
        else:
            values, target = chosen.values, chosen.target
        layout = token_layout(ds.vli.tokens(example))
        if target.startswith(CAPTION_CONTRAST):  # the other caption's score does not reach these tokens
            target = CAPTION
        title = f"text relevancy for {target}"
        return coloured_tokens(layout, np.nan_to_num(values), "relevancy", title) * token_labels(layout)

    def _on_text(
        self, example: str, relevancy_method: str, relevancy_answer: str, relevancy_versus: str, ds: xr.Dataset
    ) -> hv.Overlay:
        draw = guarded(self.selection, self._empty_text)(self._text_with)
        return draw(ds, example, relevancy_method, relevancy_answer, relevancy_versus)

    def _bound_target_row(self) -> object:
        """The pair row, drawn afresh on each change (it changes only on a pick): its first frame, a note, must
        not fix the sizes, axes and colorbars of the maps after it, as a DynamicMap's first frame would."""
        selection = self.selection.param
        fields = ("example", "relevancy_method", "relevancy_answer", "relevancy_versus", "smooth", "scale", "opacity")
        references: dict[str, Any] = {name: selection[name] for name in fields}
        return pn.bind(self._target_row, ds=self.param.ds, **references)

    def _target_row(
        self,
        example: str,
        relevancy_method: str,
        relevancy_answer: str,
        relevancy_versus: str,
        smooth: bool,
        scale: str,
        opacity: float,
        ds: xr.Dataset,
    ) -> pn.viewable.Viewable:
        """The two answers of a contrast side by side (one scale) and their difference; a note without one."""
        size = {"frame_width": COMPARISON_SIZE, "frame_height": COMPARISON_SIZE}
        if not _explains_answers(relevancy_method):
            return pn.pane.Markdown(f"{relevancy_method} reads attention only: the same map for every answer.")
        if self._captions:
            return pn.pane.Markdown(
                "A caption's contrast is the map above (**against**): the other caption's own map is its example's."
            )
        if not relevancy_versus:
            return pn.pane.Markdown("Pick a second answer (**against**) to see both maps and their difference.")
        try:
            answer = self.answer_or_prediction(example, relevancy_answer)
            first = self.reader.relevancy(ds, example, relevancy_method, answer)
            second = self.reader.relevancy(ds, example, relevancy_method, relevancy_versus)
        except VLIError as error:
            self.selection.message = str(error)
            return pn.pane.Markdown(str(error))
        pair = (first.values, second.values)
        maps = [  # the two answers on one scale, whatever the view's colour range
            self._chosen_image(ds, example, relevancy_method, one, smooth, "shared", opacity, size, pair)
            for one in (first, second)
        ]
        layout = hv.Layout([*maps, self._difference(ds, example, first, second, size)]).cols(3)
        return pn.pane.HoloViews(layout, linked_axes=False)

    @staticmethod
    def _difference(
        ds: xr.Dataset, example: str, first: ChosenRelevancy, second: ChosenRelevancy, size: dict[str, int]
    ) -> hv.Overlay:
        """first − second on the image (red: more relevant to the first answer)."""
        tokens = ds.vli.tokens(example)
        difference = np.nan_to_num(first.values) - np.nan_to_num(second.values)
        painted = ds.vli.values_on_image(example, difference).values
        top = float(np.abs(difference[tokens.image_tokens()]).max()) if len(tokens.image_tokens()) else 0.0
        label = f"{first.target} − {second.target} (±{top:.3g})" if top > 0 else "no difference"
        return difference_overlay(tokens.image, painted, label, size)

    def _comparison(self, example: str, smooth: bool, scale: str, opacity: float, ds: xr.Dataset) -> hv.Layout:
        """Every stored method's map of the prediction (other targets are reached through the answer list)."""
        size = {"frame_width": COMPARISON_SIZE, "frame_height": COMPARISON_SIZE}
        methods = _prediction_entries(ds)
        maps = [self._image_with(ds, example, method, smooth, scale, opacity, size) for method in methods]
        return hv.Layout(maps).cols(4)

    def __panel__(self) -> pn.viewable.Viewable:
        if not self.methods:
            text = (
                "This store's relevancy is per generated token (`answer_relevancy`): see the **Answer** tab."
                if self.ds.vli.answer_methods
                else "This store has no `relevancy` variable: extract with a relevancy method to see it here."
            )
            return pn.pane.Markdown(text, width=IMAGE_SIZE * 2)
        ranking = self.ds.vli.relevancy_ranking()
        options = {
            (f"{m} (top patch on the target in {ranking[m]:.0%})" if m in ranking else m): m for m in self.methods
        }
        picked = self.selection.param
        answers = pn.Column(
            pn.pane.Markdown("**Explain the score**" if self._captions else "**Explain the answer**", margin=(0, 5)),
            self._answer,
            self._versus,
            pn.pane.Markdown(pn.bind(self._versus_note, picked.relevancy_versus, picked.relevancy_method), width=170),
            pn.pane.Markdown(pn.bind(self._answer_note, self.selection.param.relevancy_method), width=170),
            visible=bool(self._answer.options) or (self._captions and len(self._versus.options) > 1),
            width=180,
        )
        method = pn.widgets.Select.from_param(
            self.selection.param.relevancy_method, options=options, label="method", width=330
        )
        notes = []
        if ranking:
            notes.append("Methods are ranked by the pointing game on this store's examples; the best is shown first.")
        if "target_mask" in self.ds:
            notes.append(f'<span style="color:{TARGET_COLOR}">- - -</span> the ground-truth target\'s outline.')
        return pn.Column(
            pn.Row(method, *scale_controls(self.selection)),
            pn.pane.HTML(" ".join(notes), sizing_mode="stretch_width"),
            pn.Row(
                answers,
                pn.pane.HoloViews(self._image, linked_axes=False),
                pn.pane.HoloViews(self._text, linked_axes=False),
            ),
            heading("This caption against another" if self._captions else "The answer against the other", level=4),
            pn.panel(self._bound_target_row()),
            heading("All methods", level=4),
            pn.pane.HoloViews(self._all_methods, linked_axes=False),
        )


def _map_on_image(
    ds: xr.Dataset,
    example: str,
    values: np.ndarray,
    title: str,
    smooth: bool,
    scale: str,
    opacity: float,
    size: dict[str, int] | None,
    shared_with: tuple[np.ndarray, ...],
) -> hv.Overlay:
    """Per-token relevancy ``values`` painted on the example's image with the target's outline, titled ``title``
    (": all 0" added for an all-zero map); the colour range follows ``scale`` over the image tokens."""
    tokens = ds.vli.tokens(example)
    image_tokens = tokens.image_tokens()
    values = np.nan_to_num(values)
    others = [np.nan_to_num(other)[image_tokens] for other in shared_with]
    colour_range = map_scale(values[image_tokens], relevancy_scale(scale), shared_with=others)
    painted = ds.vli.values_on_image(example, values, smooth=smooth).values
    size = size or image_plot_size(tokens.image)
    picture = image_element(tokens.image).opts(invert_yaxis=True, xaxis=None, yaxis=None, **size)
    heat = overlay_element(painted, colour_range, "relevancy", opacity)
    title += ": all 0" if colour_range.all_zero else ""
    return (picture * heat * target_outline(ds, example)).opts(title=fit_title(title, size["frame_width"]))


def _choice_label(answer: str, probability: float) -> str:
    """An answer with its probability as the list shows it."""
    return answer if np.isnan(probability) else f"{answer} · {probability:.1%}"


def _caption_label(caption: str, score: float) -> str:
    """Another caption with the model's score of it with this image, as the list shows it."""
    return caption if np.isnan(score) else f"{caption} · {score:.1f}"


def _explains_answers(method: str) -> bool:
    """Whether the stored method (or ``METHOD [TARGET]`` entry) explains a chosen answer; False for one this
    installation does not know (e.g. imported under another name)."""
    try:
        return depends_on_target(split_entry(method)[0])
    except VLIError:
        return False


def _prediction_entries(ds: xr.Dataset) -> list[str]:
    """The stored maps of the prediction, one per method (entries for other targets left out)."""
    return [entry for entry in ds.vli.relevancy_methods if split_entry(entry)[1].is_default]
