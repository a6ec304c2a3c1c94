"""The relevancy view's answer list drives its maps, in a real browser: a picked answer, a contrast, the pair.

``vlinterpret serve STORE --model single_stream`` on a store extracted with ``--target predicted --target
"predicted vs runner-up"``: the contrast with the runner-up is read from the store, any other answer's map is
computed with the served model.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ui.browser import AppPage, app_page, live_serve_command, served_alive
from tests.ui.conftest import changed_fraction
from vlinterpret_panel import open_dataset
from vlinterpret_panel.extract import extract, scene_sources

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def target_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("targets") / "store"
    targets = ["predicted", "predicted vs runner-up"]
    extract("single_stream", scene_sources(3), store, progress=False, relevancy=["generic"], targets=targets)
    return store


@pytest.fixture(scope="module")
def target_url(target_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("server") / "serve.log"
    with served_alive(live_serve_command(target_store, "single_stream"), log_path) as url:
        yield url


@pytest.fixture
def app(browser: object, target_url: str) -> Iterator[AppPage]:
    with app_page(browser, target_url) as page:
        yield page


def test_the_answer_list_drives_the_relevancy_maps(app: AppPage, target_store: Path, tmp_path: pathlib.Path) -> None:
    ds = open_dataset(target_store)
    answers = [str(a) for a in ds["top_answer"].isel(example=0).values]
    predicted, runner_up, third = answers[:3]
    app.open()
    app.page.get_by_text("Relevancy", exact=True).click()
    main = app.wait_for_figure(f"generic → {predicted}")
    assert "computed" not in main["title"]
    before = app.pixels(main["title"])
    app.page.get_by_text("Pick a second answer").first.wait_for()
    # Another answer: its map is computed with the served model, and it is another map.
    app.page.get_by_label(f"{third} ·").check()
    shown = app.wait_for_figure(f"generic → {third} (comp", timeout=30)
    assert changed_fraction(before, app.pixels(shown["title"])) > 0.01
    text = app.wait_for_figure(f"text relevancy for {third}", timeout=30)
    assert text
    # The prediction against the runner-up: stored (no "computed"), and the pair with its difference.
    app.page.get_by_label(f"{predicted} ·").check()
    app.wait_for_figure(f"generic → {predicted}", timeout=30)
    app.page.get_by_label("against").select_option(label=next(o for o in _options(app) if o.startswith(runner_up)))
    contrast = app.wait_for_figure(f"generic → {predicted} vs {runner_up}", timeout=30)
    assert "comp" not in contrast["title"], "the store holds this contrast: read, not computed"
    app.wait_for_figure(f"{predicted} − {runner_up}", timeout=30)
    app.scroll_to(f"{predicted} − {runner_up}")
    app.page.screenshot(path=tmp_path / "target-choice-pair.png")
    app.scroll_to(f"generic → {predicted} vs")
    app.page.screenshot(path=tmp_path / "target-choice.png")
    assert app.errors == []


def _options(app: AppPage) -> list[str]:
    return app.page.get_by_label("against").locator("option").all_inner_texts()
