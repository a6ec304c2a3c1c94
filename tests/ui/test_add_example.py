"""Add example in a real browser: ``vlinterpret serve STORE --model single_stream``, upload, run, see it."""

from __future__ import annotations

import io
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.ui.browser import APP_VIEWPORT, AppPage, app_page, live_serve_command, served_alive
from vlinterpret_panel import open_dataset
from vlinterpret_panel.extract import extract, scene_sources
from vlinterpret_panel.live import random_scene

pytestmark = pytest.mark.browser

QUESTION = "what color is the big blue square?"
BLUE = np.array([20, 40, 235], dtype=np.uint8)


def _snapshot(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in store.glob("*.nc")}


@pytest.fixture(scope="module")
def live_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary store of three scenes extracted with the built-in single_stream model."""
    made = tmp_path_factory.mktemp("made") / "store"
    extract("single_stream", scene_sources(3), made, progress=False, relevancy=["rollout"])
    copy = tmp_path_factory.mktemp("served") / "store"
    shutil.copytree(made, copy, ignore=shutil.ignore_patterns(".index"))
    return copy


@pytest.fixture(scope="module")
def live_url(live_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``vlinterpret serve STORE --model single_stream`` on a free localhost port; its URL."""
    log_path = tmp_path_factory.mktemp("server") / "serve.log"
    with served_alive(live_serve_command(live_store, "single_stream"), log_path) as url:
        yield url


@pytest.fixture
def live_app(browser: object, live_url: str) -> Iterator[AppPage]:
    with app_page(browser, live_url) as page:
        yield page


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _message(app: AppPage, text: str) -> str:
    """The whole text of the message that contains ``text``, once it shows."""
    message = app.page.get_by_text(text).first
    message.wait_for(state="visible", timeout=60_000)
    seen = ""

    def shows_text() -> bool:
        # Keep the text that matched: the sidebar is rebuilt after an add, so a second read of
        # the locator can land on the replaced (empty) element.
        nonlocal seen
        seen = message.inner_text()
        return text in seen

    app.wait_until(shows_text, timeout=10, what=f"the message {text!r}")
    return seen


_HEADINGS_JS = """() => {
    const found = [];
    const walk = (root) => root.querySelectorAll('*').forEach((e) => {
        if (e.tagName === 'H3') {
            const style = getComputedStyle(e);
            found.push([e.textContent.trim(), style.fontSize, style.fontWeight, style.marginTop]);
        }
        if (e.shadowRoot) walk(e.shadowRoot);
    });
    walk(document);
    return found;
}"""


def _headings(app: AppPage) -> dict[str, list[str]]:
    """Each section heading's font size, weight and margin as the page shows them."""
    return {text: style for text, *style in app.page.evaluate(_HEADINGS_JS)}


def _blue_share(pixels: np.ndarray) -> float:
    """Share of pixels whose blue clearly dominates (the uploaded square, under the attention overlay)."""
    return float(((pixels[..., 2] - pixels[..., :2].max(axis=-1)) > 25).mean())


def test_uploading_an_image_adds_it_to_the_store_and_selects_it(
    live_app: AppPage, browser: object, live_url: str, live_store: Path, tmp_path: Path
) -> None:
    other = AppPage(browser.new_context(viewport=APP_VIEWPORT).new_page(), live_url).open()
    app, page = live_app, live_app.page
    app.open()
    page.get_by_text("3 examples", exact=False).first.wait_for(timeout=30_000)
    before = _snapshot(live_store)
    headings = _headings(app)
    assert {"Examples", "Head and token", "Add example"} <= set(headings)

    page.locator("input[type=file]").set_input_files(
        {"name": "notes.png", "mimeType": "image/png", "buffer": b"these are notes, not pixels"}
    )
    page.get_by_placeholder("e.g. what color is the circle?").fill(QUESTION)
    page.get_by_role("button", name="Run").click()
    assert _message(app, "not a PNG or JPEG") == "the upload is not a PNG or JPEG image"
    assert _snapshot(live_store) == before

    image = random_scene(11).image.copy()
    image[8:56, 8:56] = BLUE
    page.locator("input[type=file]").set_input_files(
        {"name": "scene.png", "mimeType": "image/png", "buffer": _png(image)}
    )
    page.get_by_text("type a text and press Run").wait_for(timeout=30_000)
    page.get_by_role("button", name="Run").click()
    added = _message(app, "added live-")
    found = re.search(r"live-[0-9]{8}-[0-9]{6}-[0-9a-f]{6}", added)
    assert found, f"no example id in the message {added!r}"
    example = found.group()

    page.get_by_text("4 examples", exact=False).first.wait_for(timeout=60_000)
    app.wait_for_figure(QUESTION[:20])
    assert page.get_by_text(f"{example}: {QUESTION}").count() >= 1  # the browser lists it
    app.wait_until(lambda: f"example={example}" in page.evaluate("window.location.href"), what="the URL")
    page.screenshot(path=str(tmp_path / "added.png"))
    assert _headings(app) == headings  # the rebuilt sidebar looks as it did (its headings were 2x larger)
    app.wait_until(lambda: _blue_share(app.pixels(QUESTION[:20])) > 0.3, what="the uploaded image in the view")

    other.page.get_by_text("4 examples", exact=False).first.wait_for(timeout=30_000)  # another session follows
    assert other.page.get_by_text(f"{example}: {QUESTION}").count() >= 1

    page.get_by_role("button", name="draw a random scene").click()
    app.wait_until(lambda: page.get_by_placeholder("e.g. what color is the circle?").input_value() != QUESTION)
    question = page.get_by_placeholder("e.g. what color is the circle?").input_value()
    page.get_by_role("button", name="Run").click()
    page.get_by_text("5 examples", exact=False).first.wait_for(timeout=60_000)
    app.wait_for_figure(question[:20])
    page.screenshot(path=str(tmp_path / "scene.png"))

    ds = open_dataset(live_store)
    assert ds.sizes["example"] == 5 and str(ds.text.sel(example=example).values) == QUESTION
    np.testing.assert_array_equal(ds.image.sel(example=example).values[:64, :64], image)
    assert {k: v for k, v in _snapshot(live_store).items() if k in before} == before
    assert app.errors == [] and other.errors == []
