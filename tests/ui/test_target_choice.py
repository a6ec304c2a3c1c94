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
MAIN_MAP_MIN_WIDTH = 200  # the main map's frame is 240 px wide, the grid's 180


@pytest.fixture(scope="module")
def target_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("targets") / "store"
    targets = ["predicted", "predicted vs runner-up"]
    relevancy = ["generic", "attnlrp"]
    extract("single_stream", scene_sources(3), store, progress=False, relevancy=relevancy, targets=targets)
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
    _choose_method(app, "generic")
    main = _main_map(app, f"generic → {predicted}")
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


def test_attnlrp_is_shown_on_its_signed_scale_and_computed_for_another_answer(
    app: AppPage, target_store: Path, tmp_path: pathlib.Path
) -> None:
    ds = open_dataset(target_store)
    predicted, _, third = (str(a) for a in ds["top_answer"].isel(example=0).values[:3])
    app.open()
    app.page.get_by_text("Relevancy", exact=True).click()
    app.wait_for_figure(f"generic → {predicted}")
    _choose_method(app, "attnlrp")
    stored = _main_map(app, f"attnlrp → {predicted}")
    before = app.pixels(stored["title"])
    app.page.get_by_label(f"{third} ·").check()
    computed = app.wait_for_figure(f"attnlrp → {third} (comp", timeout=30)
    assert changed_fraction(before, app.pixels(computed["title"])) > 0.01
    app.page.screenshot(path=tmp_path / "attnlrp.png")
    assert app.errors == []


def test_a_caption_against_another_is_explained_with_the_served_dual_encoder(
    browser: object, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The dual encoder's relevancy view offers the store's other captions, ranked by the model's score with the
    image; picking one computes the contrast's map (image: the difference of the scores; text: this caption's)."""
    store = tmp_path_factory.mktemp("captions") / "store"
    extract("dual_encoder", scene_sources(4, text="caption"), store, progress=False, relevancy=["generic"])
    ds = open_dataset(store)
    with (
        served_alive(live_serve_command(store, "dual_encoder"), tmp_path_factory.mktemp("server") / "log") as url,
        app_page(browser, url) as app,
    ):
        app.open()
        app.page.get_by_text("Relevancy", exact=True).click()
        score = _main_map(app, "generic → score")
        before = app.pixels(score["title"])
        app.page.get_by_text("Explain the score", exact=True).wait_for()
        offered = [option for option in _options(app) if option != "none"]
        others = {str(text) for text in ds["text"].values[1:]}
        assert {option.rsplit(" · ", 1)[0] for option in offered} == others
        scores = [float(option.rsplit(" · ", 1)[1]) for option in offered]
        assert scores == sorted(scores, reverse=True)  # the captions the model confuses most come first
        app.page.get_by_label("against").select_option(label=offered[0])
        contrast = _main_map(app, "generic → this − other")
        assert changed_fraction(before, app.pixels(contrast["title"])) > 0.01
        app.page.get_by_text(f"against: {offered[0].rsplit(' · ', 1)[0]} (map computed)").wait_for()
        app.wait_for_figure("text relevancy for this caption")
        assert app.errors == []


def _main_map(app: AppPage, prefix: str, timeout: float = 30) -> dict:
    """The view's main map titled ``prefix...`` once it is drawn: the all-methods grid below has a smaller plot
    of the same title (the method's map of the prediction) from the start."""
    found: list[dict] = []

    def drawn() -> bool:
        found[:] = [f for f in app.figures() if f["title"].startswith(prefix) and f["width"] > MAIN_MAP_MIN_WIDTH]
        return bool(found)

    app.wait_until(drawn, timeout=timeout, what=f"the main map {prefix!r}")
    return found[0]


def _choose_method(app: AppPage, name: str) -> None:
    """Pick ``name`` in the method list (its options read "NAME (top patch on the target in ...)")."""
    method = app.page.get_by_label("method")
    method.locator("option").first.wait_for(state="attached")
    names = method.locator("option").all_inner_texts()
    method.select_option(index=next(i for i, option in enumerate(names) if option.split(" (")[0] == name))
    app.page.get_by_text(f"{name} explains the picked answer").first.wait_for()


def _options(app: AppPage) -> list[str]:
    return app.page.get_by_label("against").locator("option").all_inner_texts()
