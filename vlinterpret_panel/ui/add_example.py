"""Add example: upload an image (or draw a random scene), type a text, run the live model into the store.

``AddExample`` is the form; the work (checks, model run, atomic shard) is ``vlinterpret_panel.live``,
run in a worker thread so the server keeps serving meanwhile. ``ui.session.LiveSession`` puts
it beside a dashboard that follows the store.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import panel as pn
import torch

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.live import MAX_TEXT_CHARS, MAX_UPLOAD_BYTES, AddedExample, LiveModel, SceneDraft, decode_image
from vlinterpret_panel.live import random_scene as draw_scene
from vlinterpret_panel.ui.common import heading

logger = logging.getLogger(__name__)

# Every model run of the server (added examples, counterfactuals, causal searches) in one thread: the model is
# shared by every session, and torch's OpenMP pool, driven from a second thread, stalled: a causal search that
# takes 0.25 s took 17 s when it ran in its own thread after an example was added in this one.
MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vli-model")


@functools.lru_cache(maxsize=2)
def live_model(spec: str) -> LiveModel:
    """The model named by ``spec``, loaded once per server process and shared by its sessions.

    A built-in model runs torch on one thread: its operations are too small for a second thread
    to pay, and the server renders pages and the browser draws them on the same cores meanwhile.
    A counterfactual rerun beside a busy process took p50 286 ms, max 785 ms on two threads and
    p50 209 ms, max 352 ms on one (two cores); large models keep torch's default.
    """
    model = LiveModel(spec)
    if model.builtin:
        torch.set_num_threads(1)
    return model


@functools.lru_cache(maxsize=8)
def warm_up(spec: str, store: Path) -> None:
    """Warm ``spec``'s model up on ``store`` once per server process, in the model thread, and wait for it: the
    first edit then runs as fast as the next ones (0.65 s -> 0.1 s in process on the built-in generative model).

    ``vlinterpret serve`` calls it before it listens. It waits so that no page is built while it runs (lazy
    imports of sympy and torch's symbolic-shape modules among its work): a page opened just after the server
    started, with the warm-up running in the background, once came out empty in CI.
    """

    def run() -> None:
        from vlinterpret_panel.store import shard_signature
        from vlinterpret_panel.ui.app import shared_store

        try:
            live_model(spec).warm_up(shared_store(store, shard_signature(store) if store.is_dir() else ""))
        except Exception:  # a failed warm-up costs the first edit its speed, nothing else
            logger.exception("model warm-up failed")

    MODEL_THREAD.submit(run).result()


def _png(pixels: np.ndarray, width: int = 128) -> bytes:
    from PIL import Image

    image = Image.fromarray(pixels)
    if image.width < width:
        image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class AddExample(pn.viewable.Viewer):
    """The form: an image (upload, or a random scene for built-in models), a text, and Run."""

    def __init__(self, model: LiveModel, store: Path, on_added: Callable[[AddedExample], None]) -> None:
        super().__init__()
        self.model, self.store, self._on_added = model, Path(store), on_added
        self.running = False  # an example of this session is in the model thread
        self._draft: SceneDraft | None = None
        self.upload = pn.widgets.FileInput(accept=".png,.jpg,.jpeg,image/png,image/jpeg", multiple=False)
        self.draw = pn.widgets.Button(label="draw a random scene", visible=model.builtin)
        self.text = pn.widgets.TextInput(
            label="question or caption", placeholder="e.g. what color is the circle?", max_length=MAX_TEXT_CHARS
        )
        self.run_button = pn.widgets.Button(label="Run", color="primary")
        self.progress = pn.indicators.Progress(active=True, visible=False, sizing_mode="stretch_width", height=12)
        self.preview = pn.pane.PNG(None, width=128, visible=False)
        self.status = pn.pane.Alert("", alert_type="info", visible=False, sizing_mode="stretch_width")
        self.upload.param.watch(self._uploaded, "value")
        self.draw.on_click(self._draw_scene)
        self.run_button.on_click(self._run)

    def _say(self, message: str, kind: str = "info") -> None:
        self.status.param.update(object=message, alert_type=kind, visible=bool(message))

    def _uploaded(self, event: object = None) -> None:
        if self.upload.value is None:
            return
        self._draft = None
        self.preview.visible = False
        self._say(f"{self.upload.filename}: {len(self.upload.value) / 1024:.0f} kB; type a text and press Run")

    def _draw_scene(self, event: object = None) -> None:
        self._draft = draw_scene()
        self.preview.param.update(object=_png(self._draft.image), visible=True)
        self.text.value = self._draft.question
        self._say(f"a random scene; its answer: {self._draft.answer}")

    def _inputs(self) -> tuple[np.ndarray, dict]:
        """The image and what is known about it (label and target mask of an unedited scene question)."""
        if self._draft is not None:
            draft = self._draft
            same = (self.text.value or "").strip() == draft.question
            return draft.image, ({"label": draft.answer, "target_mask": draft.target_mask} if same else {})
        if self.upload.value is None:
            hint = " or draw a random scene" if self.model.builtin else ""
            raise VLIError(f"choose a PNG or JPEG image to upload{hint}")
        return decode_image(self.upload.value, max_bytes=MAX_UPLOAD_BYTES), {}

    def add(self) -> AddedExample:
        """Check the inputs and add the example (blocking: runs the model and writes the shard)."""
        image, known = self._inputs()
        return self.model.add_example(self.store, image, self.text.value or "", **known)

    async def _run(self, event: object = None) -> None:
        self.running = True
        self.run_button.disabled = self.draw.disabled = True
        self.progress.visible = True
        self._say("running the model…")
        try:
            added = await asyncio.get_running_loop().run_in_executor(MODEL_THREAD, self.add)
        except VLIError as error:
            self._say(str(error), "danger")
            return
        except Exception as error:  # the server keeps serving; the user gets one line, the log the traceback
            logger.exception("add example failed")
            self._say(f"could not add the example: {type(error).__name__}: {error}", "danger")
            return
        finally:
            self.running = False
            self.run_button.disabled = self.draw.disabled = False
            self.progress.visible = False
        prediction = f"; prediction: {added.prediction}" if added.prediction is not None else ""
        self._say(f"added {added.example_id}{prediction}", "success")
        self._on_added(added)

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(
            heading("Add example"),
            pn.pane.Markdown(f"A PNG or JPEG of at most {MAX_UPLOAD_BYTES // 2**20} MB, or a random scene."),
            self.upload,
            self.draw,
            self.preview,
            self.text,
            self.run_button,
            self.progress,
            self.status,
            sizing_mode="stretch_width",
        )
