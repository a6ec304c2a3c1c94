"""Counterfactual edits and causal explanations in a real browser, on ``vlinterpret serve STORE --model generative``."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.ui.browser import AppPage, app_page, live_serve_command, served_alive
from vlinterpret_panel import causal, open_dataset
from vlinterpret_panel.adapters.registry import load_adapter

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
ORIGINAL = "scene-1000000000"  # "describe the scene": a yellow triangle at the top left and ...


@pytest.fixture(scope="module")
def generative_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("served") / "store"
    shutil.copytree(REPO / "datasets" / "generative", store, ignore=shutil.ignore_patterns(".index"))
    return store


@pytest.fixture(scope="module")
def generative_url(generative_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("server") / "serve.log"
    with served_alive(live_serve_command(generative_store, "generative"), log_path) as url:
        yield url


@pytest.fixture
def app(browser: object, generative_url: str) -> Iterator[AppPage]:
    with app_page(browser, generative_url) as page:
        page.page.goto(generative_url)
        page.wait_for_figure("generated answer")
        yield page


def _drag(app: AppPage, prefix: str, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Drag from ``start`` to ``end`` given as fractions of the frame of the plot ``prefix...``."""
    frame = app.figure(prefix)
    x0, y0 = frame["left"] + start[0] * frame["width"], frame["top"] + start[1] * frame["height"]
    x1, y1 = frame["left"] + end[0] * frame["width"], frame["top"] + end[1] * frame["height"]
    app.page.mouse.move(x0, y0)
    app.page.mouse.down()
    app.page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=4)
    app.page.mouse.move(x1, y1, steps=4)
    app.page.mouse.up()


def test_a_masked_region_rerun_adds_a_linked_example_with_another_answer(app: AppPage, generative_store: Path) -> None:
    app.page.get_by_text("Counterfactual", exact=True).click()
    app.wait_for_figure("draw on")
    app.wait_for_figure("edited image")
    before = app.pixels("edited image")
    _drag(app, "draw on", (0.01, 0.01), (0.5, 0.5))  # the top-left quarter: the yellow triangle
    app.wait_until(lambda: np.abs(app.pixels("edited image") - before).max() > 50, what="the masked preview")
    app.page.get_by_role("button", name="Run edit").click()
    app.page.get_by_text("added live-").first.wait_for(timeout=60_000)
    ds = open_dataset(generative_store)
    edits = ds.vli.counterfactuals(ORIGINAL)
    assert len(edits) == 1
    edited = edits[0]
    assert ds.vli.origin(edited) == ORIGINAL
    assert ds.vli.edit(edited).box is not None and ds.vli.edit(edited).fill == "background"
    original_answer, edited_answer = ds.vli.answer(ORIGINAL), ds.vli.answer(edited)
    assert list(original_answer["token"]) != list(edited_answer["token"])
    # The page compares the pair: both outcomes and the difference map, at the first token that changed.
    app.wait_for_figure("original: a yellow")
    app.wait_for_figure("edited: a ")
    difference = app.wait_for_figure("edited − original")
    assert difference["width"] > 100
    app.wait_until(lambda: f"edited={edited}" in app.page.url, what="the compared edit in the URL")
    # The example browser lists the original's counterfactuals; choosing one shows its link to the original.
    app.page.get_by_text("counterfactuals of this example (1)").first.wait_for(timeout=10_000)
    app.page.get_by_label("counterfactuals of this example (1)").select_option(index=1)
    app.page.get_by_text(f"counterfactual of {ORIGINAL}").first.wait_for(timeout=10_000)
    assert not app.errors, app.errors


def test_a_brush_stroke_masks_its_width_and_clear_forgets_it(app: AppPage) -> None:
    app.page.get_by_text("Counterfactual", exact=True).click()
    app.wait_for_figure("draw on")
    app.wait_for_figure("edited image")
    before = app.pixels("edited image")
    app.page.get_by_title("Freehand Draw").first.click()
    _drag(app, "draw on", (0.1, 0.25), (0.9, 0.25))  # across the circle and the red square, below the triangles
    app.wait_until(lambda: np.abs(app.pixels("edited image") - before).max() > 50, what="the brushed preview")
    changed = np.abs(app.pixels("edited image") - before).max(axis=2) > 50
    rows = np.flatnonzero(changed.any(axis=1)) / changed.shape[0]
    assert rows.min() > 0.1 and rows.max() < 0.4  # a band around a quarter of the height: the brush's 8 pixels of 64
    app.page.get_by_role("button", name="Clear").click()
    app.wait_until(lambda: np.abs(app.pixels("edited image") - before).max() < 10, what="the cleared preview")
    assert not app.errors, app.errors


def test_a_causal_explanations_kept_set_keeps_its_probability_when_rerun(app: AppPage, generative_store: Path) -> None:
    app.page.get_by_text("Causal", exact=True).click()
    app.wait_for_figure("no causal explanation yet")
    app.page.get_by_role("button", name="Explain").click()
    app.page.get_by_text("reruns in").first.wait_for(timeout=60_000)
    (found,) = causal.load(generative_store, ORIGINAL)
    assert (found.step, found.threshold, found.token) == (0, 0.9, "a")
    title = app.wait_for_figure(f"{found.token!r}: {len(found.kept)} of {len(found.units)} kept")
    assert title["width"] > 100
    # Rerun outside the UI with a fresh adapter: the kept set alone keeps the stated probability.
    ds = open_dataset(generative_store)
    tokens = ds.vli.tokens(ORIGINAL)
    position = int(ds.vli.answer(ORIGINAL)["position"].iloc[0])
    adapter = load_adapter("generative")
    units = np.array(found.units)
    probabilities, _ = adapter.kept_outputs(
        tokens.image, list(tokens.token_text), position, units, [units, np.array(found.kept)], found.token
    )
    assert probabilities[1] == pytest.approx(found.kept_probability, abs=1e-6)
    assert probabilities[1] >= 0.9 * probabilities[0]
    assert not app.errors, app.errors
