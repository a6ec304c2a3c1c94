"""Causal view: the smallest input that keeps an output, and the fewest patches it needs, on the image.

"Explain" runs ``LiveModel.explain_causally`` for the selected example and generated token
(or VQA answer) in a background thread, with a progress bar and a Cancel button; the server
and other sessions keep running meanwhile (the model is held per rerun only). The result is
saved beside the store's shards and drawn: patches outside the sufficient set dimmed, the
necessary patches outlined, the kept prompt tokens in bold. Without a live model the view
shows the explanations stored earlier.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from pathlib import Path

import holoviews as hv
import numpy as np
import panel as pn
import param
import xarray as xr

from vlinterpret_panel import causal
from vlinterpret_panel.causal import CancelledError, CausalExplanation
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.live import LiveModel
from vlinterpret_panel.ui.answer import AnswerMapView, step_choices, step_chooser
from vlinterpret_panel.ui.common import dynamic_map, fit_title, guarded
from vlinterpret_panel.ui.image import image_element, image_plot_size, map_element
from vlinterpret_panel.ui.selection import Selection

logger = logging.getLogger(__name__)

POLL_MS = 200
IMAGE_SIZE = 320
NECESSARY_COLOR = "#d62728"
# Deleted patches are veiled in light grey: the built-in scenes are drawn on dark backgrounds.
DELETED_COLOR = "#d9d9d9"


class CausalView(AnswerMapView):
    """A causal explanation of the selected example's output, computed in the background or read from the store."""

    step = param.Integer(default=0, bounds=(0, None), doc="the generated token explained (0 for a VQA answer)")
    threshold = param.Number(default=causal.DEFAULT_THRESHOLD, bounds=(0.05, 1.0), doc="share of the probability kept")

    def __init__(
        self,
        ds: xr.Dataset,
        selection: Selection | None = None,
        *,
        live: LiveModel | None = None,
        store: Path | None = None,
        **params,
    ) -> None:
        super().__init__(ds, selection, **params)
        self.live, self.store = live, store
        self.dataset_changed()
        self.redraw = hv.streams.Counter()
        own = hv.streams.Params(self, ["step", "threshold", "method"])
        self._image = dynamic_map(self._draw, streams=[own, self.redraw, *self.streams("example")])
        self._tokens = pn.pane.Markdown("", width=IMAGE_SIZE + 120)
        self.explain_button = pn.widgets.Button(label="Explain", color="primary", width=110)
        self.cancel_button = pn.widgets.Button(label="Cancel", width=90, disabled=True)
        self.explain_button.on_click(self._start)
        self.cancel_button.on_click(self.cancel)
        self.progress = pn.indicators.Progress(value=0, max=100, width=300, height=12, visible=False)
        self.status = pn.pane.Alert("", alert_type="info", visible=False, width=420)
        self._run: Future | None = None
        self._cancel = threading.Event()
        self._progress: tuple[float, str] = (0.0, "")
        self._poller: pn.io.callbacks.PeriodicCallback | None = None
        self._step_choice = step_chooser(self)
        self.param.watch(self._show_tokens, ["step", "threshold", "method"])
        self.selection.param.watch(self._example_changed, "example")
        self._example_changed()

    # State

    def dataset_changed(self) -> None:
        """The maps that can guide the search in this store."""
        self.offer_maps(first=not hasattr(self, "_step_choice"))  # generic relevancy when the view opens

    def _example_changed(self, *events: param.parameterized.Event) -> None:
        steps = len(self.ds.vli.answer(self.selection.example)) if self.ds.vli.has_answers else 1
        self.param.step.bounds = (0, max(0, steps - 1))
        self.step = min(self.step, max(0, steps - 1))
        if hasattr(self, "_step_choice"):
            self._step_choice.options = step_choices(self.ds, self.selection.example)
            self._show_tokens()

    def explanation(self, example: str | None = None) -> CausalExplanation | None:
        """The stored explanation of ``example`` at this view's step, threshold and method (else the step's latest)."""
        stored = self.ds.vli.causal_explanations(example or self.selection.example)
        same_step = [e for e in stored if e.step == self.step]
        exact = [e for e in same_step if (e.threshold, e.method) == (self.threshold, self.method)]
        return (exact or same_step or [None])[-1]

    # The background run

    def _report(self, fraction: float, message: str) -> None:  # called from the worker thread
        self._progress = (fraction, message)

    def start(self) -> Future:
        """Start the search for the current example, step, threshold and method; returns its future."""
        if self.live is None or self.store is None:
            raise VLIError("serve the store with --model to compute causal explanations")
        self._cancel = threading.Event()
        self._progress = (0.0, "starting")
        from vlinterpret_panel.ui.add_example import MODEL_THREAD

        return MODEL_THREAD.submit(
            self.live.explain_causally,
            self.store,
            self.selection.example,
            step=self.step,
            threshold=self.threshold,
            method=self.method,
            progress=self._report,
            cancel=self._cancel,
        )

    def _start(self, event: object = None) -> None:
        try:
            self._run = self.start()
        except VLIError as error:
            self._say(str(error), "danger")
            return
        self.explain_button.disabled, self.cancel_button.disabled = True, False
        self.progress.param.update(value=0, visible=True)
        self._say("searching…", "info")
        if self._poller is None:
            self._poller = pn.state.add_periodic_callback(self.check, period=POLL_MS)

    def cancel(self, event: object = None) -> None:
        """Ask the running search to stop at its next rerun."""
        self._cancel.set()

    def check(self) -> None:
        """Show the run's progress; when it is done, its result (called periodically while it runs)."""
        run = self._run
        if run is None:
            return
        fraction, message = self._progress
        self.progress.value = round(100 * fraction)
        if not run.done():
            self._say(f"searching… {message}", "info")
            return
        self._run = None
        if self._poller is not None:
            self._poller.stop()
            self._poller = None
        self.explain_button.disabled, self.cancel_button.disabled = False, True
        self.progress.visible = False
        try:
            found = run.result()
        except CancelledError:
            self._say("cancelled; nothing stored", "warning")
            return
        except VLIError as error:
            self._say(str(error), "danger")
            return
        except Exception as error:  # the server keeps serving; the user gets one line, the log the traceback
            logger.exception("causal explanation failed")
            self._say(f"the search failed: {type(error).__name__}: {error}", "danger")
            return
        self._say(f"{found.summary()}; {found.reruns} reruns in {found.seconds:.2f} s", "success")
        self.redraw.event()
        self._show_tokens()

    def _say(self, message: str, kind: str) -> None:
        self.status.param.update(object=message, alert_type=kind, visible=bool(message))

    # Drawing

    def _empty(self, message: str) -> hv.Overlay:
        blank = np.full((1, 1, 3), 255, dtype=np.uint8)
        return image_element(blank).opts(title=message[:70], xaxis=None, yaxis=None) * hv.Rectangles([])

    def _draw(self, example: str, step: int, threshold: float, method: str, counter: int, ds: xr.Dataset) -> hv.Overlay:
        @guarded(self.selection, self._empty)
        def paint() -> hv.Overlay:
            tokens = ds.vli.tokens(example)
            size = image_plot_size(tokens.image, IMAGE_SIZE)
            picture = image_element(tokens.image).opts(invert_yaxis=True, xaxis=None, yaxis=None, **size)
            found = self.explanation(example)
            if found is None:
                title = "no causal explanation yet" + (": press Explain" if self.live is not None else "")
                return (picture * hv.Rectangles([])).opts(title=fit_title(title, size["frame_width"]))
            kept, necessary = set(found.kept), found.necessary
            image_tokens = tokens.image_tokens()
            dimmed = np.zeros(tokens.n_tokens)
            dimmed[[p for p in image_tokens if p not in kept]] = 1.0
            shade = ds.vli.values_on_image(example, dimmed).values
            veil = map_element(np.where(shade > 0, 1.0, np.nan), "deleted").opts(
                cmap=[DELETED_COLOR], alpha=0.8, invert_yaxis=True, clim=(0, 1), colorbar=False
            )
            boxes = [tuple(tokens.token_box[p]) for p in necessary]
            outlines = hv.Rectangles(boxes).opts(
                fill_alpha=0, line_color=NECESSARY_COLOR, line_width=3, invert_yaxis=True
            )
            title = (
                f"{found.token!r}: {len(found.kept)} of {len(found.units)} kept, "
                f"p {found.kept_probability:.3f} ({found.kept_share:.0%})"
            )
            return (picture * veil * outlines).opts(title=fit_title(title, size["frame_width"] + 80))

        return paint()

    def _show_tokens(self, *events: param.parameterized.Event) -> None:
        """The text tokens (kept in bold, deleted struck through) and the explanation's figures."""
        try:
            found = self.explanation()
        except VLIError as error:
            self._tokens.object = str(error)
            return
        if found is None:
            self._tokens.object = (
                "The **sufficient set**: the fewest patches and prompt tokens that, kept alone, keep the output at "
                "the chosen share of its probability. The **necessary set** (outlined): the fewest patches whose "
                "deletion changes it."
            )
            return
        tokens = self.ds.vli.tokens(found.example)
        units, kept = set(found.units), set(found.kept)
        prompt_end = max(found.units, default=0) + 2  # the prompt and the special token after it, not the answer
        words = [
            f"**{t}**" if p in kept else (f"~~{t}~~" if p in units else t)
            for p, t in enumerate(tokens.token_text[:prompt_end])
            if tokens.modality[p] != "image"
        ]
        changed = (
            f"deleting the {len(found.necessary)} outlined patch(es) makes it {found.changed_to!r}"
            if found.necessary
            else "no set of patches changes it (deleting every patch keeps it the most probable)"
        )
        self._tokens.object = (
            f"{found.summary()}  \n"
            f"text kept (bold) and deleted (struck): {' '.join(words)}  \n"
            f"necessary: {changed}  \n"
            f"guided by {found.method}, threshold {found.threshold:.0%}, {found.reruns} reruns, "
            f"{found.seconds:.2f} s, {found.created}"
        )

    def __panel__(self) -> pn.viewable.Viewable:
        controls = [
            self._step_choice,
            pn.widgets.FloatSlider.from_param(self.param.threshold, label="keep at least", step=0.05, width=180),
            pn.widgets.Select.from_param(self.param.method, label="guided by", width=170),
        ]
        if self.live is not None:
            controls += [self.explain_button, self.cancel_button]
        return pn.Column(
            pn.Row(*controls),
            pn.Row(self.progress, self.status),
            pn.Row(pn.pane.HoloViews(self._image, linked_axes=False), self._tokens),
        )
