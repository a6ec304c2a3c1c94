"""The answer view in chromium: a store of generated answers, token by token.

A store with only the answers' attention rows (the default of ``--generate``) opens on the
answer view alone; the shipped generative store (full maps) adds it as the first tab and a
chosen token makes its predicting query the selected token of the other views.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.ui.browser import REPO, AppPage, app_page, panel_serve_command, served
from tests.ui.conftest import changed_fraction
from vlinterpret_panel import open_dataset
from vlinterpret_panel.adapters.generative import GenerationOptions
from vlinterpret_panel.adapters.registry import load_adapter
from vlinterpret_panel.extract import extract, scene_sources
from vlinterpret_panel.ui.answer import strip_layout

pytestmark = pytest.mark.browser

STRIP = "generated answer"
CONTRAST = "predicted vs runner-up"


@pytest.fixture(scope="module")
def answer_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four held-out descriptions by the built-in generative model, answer rows only, all four methods."""
    path = tmp_path_factory.mktemp("answers") / "store"
    options = GenerationOptions(methods=["raw_attention", "rollout", "attention_gradcam", "generic"])
    targets = ["predicted", CONTRAST]
    extract(
        load_adapter("generative"),
        scene_sources(4, text="describe"),
        path,
        generation=options,
        targets=targets,
        progress=False,
    )
    return path


def shipped_store() -> Path:
    """``datasets/generative`` (skips the test when it has not been made)."""
    store = REPO / "datasets" / "generative"
    if not store.exists():
        pytest.skip("datasets/generative is made by extract/make_demo_datasets.py")
    return store


@contextmanager
def _served_page(browser: object, store: Path, tmp_path: Path) -> Iterator[AppPage]:
    """A browser page of ``panel serve`` on ``store`` (its own server)."""
    with (
        served(lambda port: panel_serve_command(store, port), tmp_path / "serve.log") as (url, _server),
        app_page(browser, url) as page,
    ):
        yield page


@pytest.fixture
def answer_app(browser: object, answer_store: Path, tmp_path: Path) -> Iterator[AppPage]:
    with _served_page(browser, answer_store, tmp_path) as page:
        yield page


def test_a_click_on_a_generated_token_changes_its_map_and_alternatives(answer_app: AppPage, answer_store: Path) -> None:
    ds = open_dataset(answer_store)
    example = str(ds.example.values[0])
    answer = ds.vli.answer(example)
    answer_app.page.goto(answer_app.url)
    answer_app.wait_for_figure(STRIP)
    first = f"{answer['token'].iloc[0]!r}"
    answer_app.wait_for_figure(first)
    image_before = answer_app.pixels(first)
    alternatives_before = answer_app.page.inner_text("table")
    boxes = strip_layout(answer)
    step = 2  # the colour word of "a <colour> <shape> ...": a token about one object
    target = boxes[boxes.step == step].iloc[0]
    answer_app.click_data(STRIP, (target.x0 + target.x1) / 2, (target.y0 + target.y1) / 2)
    title = f"{answer['token'].iloc[step]!r}"
    answer_app.wait_for_figure(title)
    answer_app.wait_until(
        lambda: changed_fraction(image_before, answer_app.pixels(title)) > 0.01, what="the image map to change"
    )
    answer_app.wait_until(lambda: answer_app.page.inner_text("table") != alternatives_before, what="new alternatives")
    expected = ds.vli.alternatives(example, step)["token"].iloc[0]
    assert expected in answer_app.page.inner_text("table")
    assert answer_app.figure(STRIP)["title"].startswith(f"{STRIP}: token {step} selected")
    reliance = answer_app.wait_for_figure("where each token's")  # image / prompt / answer shares per token
    assert f"(token {step}: {step}:{answer['token'].iloc[step]})" in reliance["title"]
    # The contrast with the runner-up: its map differs, and its title names both tokens of this step.
    generic = answer_app.pixels(f"{answer['token'].iloc[step]!r}: generic")
    runner_up = ds.vli.alternatives(example, step)["token"].iloc[1]
    contrast_title = f"{answer['token'].iloc[step]!r} vs {runner_up!r}: generic"
    answer_app.page.get_by_label("map").select_option(f"generic [{CONTRAST}]")
    answer_app.wait_for_figure(contrast_title)
    answer_app.wait_until(
        lambda: changed_fraction(generic, answer_app.pixels(contrast_title)) > 0.002, what="the contrast's map"
    )
    # The generated token and its map are URL state: the page's link opens on them.
    answer_app.wait_until(lambda: f"step={step}" in answer_app.page.url, what="the step in the URL")
    answer_app.wait_until(lambda: "map=generic" in answer_app.page.url, what="the map in the URL")
    other = ds.example.values[1]
    answer_app.page.goto(f"{answer_app.url}?example={other}&step=1&map=generic+%5B{CONTRAST.replace(' ', '+')}%5D")
    answer_app.wait_for_figure(f"{STRIP}: token 1 selected")
    answer_app.wait_for_figure(repr(ds.vli.answer(str(other))["token"].iloc[1]) + " vs ")
    assert not answer_app.errors, answer_app.errors


def test_the_shipped_generative_store_opens_on_the_answer_tab_and_links_the_attention_views(
    browser: object, tmp_path: Path
) -> None:
    store = shipped_store()
    ds = open_dataset(store)
    example = str(ds.example.values[0])
    answer = ds.vli.answer(example)
    with _served_page(browser, store, tmp_path) as page:
        page.page.goto(page.url)
        page.wait_for_figure(STRIP)
        boxes = strip_layout(answer)
        step = len(answer) - 2  # the last word before [EOS]
        target = boxes[boxes.step == step].iloc[0]
        page.click_data(STRIP, (target.x0 + target.x1) / 2, (target.y0 + target.y1) / 2)
        page.wait_for_figure(f"{STRIP}: token {step} selected")
        page.page.get_by_text("Attention", exact=True).click()
        query = int(answer["position"].iloc[step]) - 1
        text_title = f"attention from {query}:{ds.vli.tokens(example).token_text[query]}"
        page.wait_for_figure(text_title)  # the text view follows the generated token's predicting query
        assert not page.errors, page.errors


def test_the_reliance_chart_lists_the_least_image_reliant_examples_and_opens_one(
    browser: object, tmp_path: Path
) -> None:
    store = shipped_store()
    ds = open_dataset(store)
    position = 3
    at = ds.vli.dataset_reliance("generic").isel(step=position).sel(part="image").to_pandas().dropna()
    least = str(at.idxmin())  # the example whose token 3 relies least on the image
    with _served_page(browser, store, tmp_path) as page:
        page.page.goto(page.url)
        page.wait_for_figure(STRIP)
        page.page.get_by_text("Reliance", exact=True).click()
        chart = "mean share of each generated token's map"
        page.wait_for_figure(chart)
        page.click_data(chart, position, 0.5)
        listed = page.page.get_by_label("examples at the tapped")
        listed.locator("option", has_text=least).first.wait_for(state="attached", timeout=20_000)
        assert least in listed.locator("option").nth(1).inner_text()  # first after the placeholder
        listed.select_option(index=1)
        page.page.get_by_text(least, exact=True).first.wait_for(timeout=20_000)  # the sidebar's details heading
        assert not page.errors, page.errors
