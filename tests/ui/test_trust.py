"""Views a researcher can trust at a glance, checked in chromium at 1600 x 1000 (and 1280 x 800).

Selection never fades the data, every colorbar has readable tick labels inside its plot, the
first screen of every shipped demo store shows a map on the image, the head mean stays on
screen, and a shared link naming a numeric example id opens that example.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.ui.browser import REPO, AppPage, app_page, panel_serve_command, served
from vlinterpret_panel import open_dataset
from vlinterpret_panel.schema import TEXT, records_to_dataset
from vlinterpret_panel.store import write_shard
from vlinterpret_panel.synth import SynthSpec, synthetic_record
from vlinterpret_panel.ui.text import token_layout

pytestmark = pytest.mark.browser

NUMBER = re.compile(r"^-?\d+(\.\d+)?(e[-+]?\d+)?$")
DEMO_STORES = ("single_stream", "dual_stream", "dual_encoder")


def settled(app: AppPage, prefix: str, timeout: float = 20) -> np.ndarray:
    """The plot's pixels once two reads 0.4 s apart agree (the redraw is over), the pointer moved off it."""
    app.page.mouse.move(2, 2)  # a hover tooltip would cover the plot
    deadline = time.monotonic() + timeout
    last = app.pixels(prefix)
    while time.monotonic() < deadline:
        time.sleep(0.4)
        now = app.pixels(prefix)
        if now.shape == last.shape and np.array_equal(now, last):
            return now
        last = now
    raise AssertionError(f"the plot {prefix!r} did not settle")


def test_clicks_never_fade_the_unselected_cells_and_tokens(app: AppPage, relevancy_store: Path) -> None:
    ds = open_dataset(relevancy_store)
    app.open()
    summary = "cross_modal"
    before = settled(app, summary)
    app.click_data(summary, "1", "0")
    app.wait_until(lambda: not np.array_equal(app.pixels(summary), before), what="the marker to move")
    after = settled(app, summary)
    layers, heads = ds.sizes["layer"], ds.sizes["head"]
    cell_height = app.figure(summary)["height"] / layers
    cell_width = app.figure(summary)["width"] / (heads + 1)
    keep = np.ones(before.shape[:2], dtype=bool)
    figure = app.figure(summary)
    for column, row in (("mean", str(layers - 1)), ("1", "0")):  # old selection (head mean, last layer), new
        x, y = app.data_position(summary, column, row)
        left, top = x - figure["left"], y - figure["top"]
        keep[
            max(0, int(top - cell_height / 2 - 4)) : int(top + cell_height / 2 + 4),
            max(0, int(left - cell_width / 2 - 4)) : int(left + cell_width / 2 + 4),
        ] = False
    assert keep.mean() > 0.5
    np.testing.assert_array_equal(after[keep], before[keep], err_msg="unselected head-summary cells changed")

    text = "attention from"
    info = ds.vli.tokens(str(ds.example.values[0]))
    layout = token_layout(info)
    word = layout[layout.token == int(info.tokens_of(TEXT)[2])].iloc[0]
    word_at = ((word.x0 + word.x1) / 2, (word.y0 + word.y1) / 2)
    app.click_data(text, *word_at)
    app.wait_until(lambda: app.figure(text)["title"].startswith(f"{text} {word.token}:"), what="the word as the query")
    first_word = settled(app, text)
    image_title = app.figures()[1]["title"]
    patch = int(info.image_tokens()[0])
    x0, y0, x1, y1 = info.token_box[patch]
    app.click_data(image_title, (x0 + x1) / 2, (y0 + y1) / 2)
    app.wait_until(lambda: app.figure(text)["title"].startswith(f"{text} {patch}:"), what="the patch as the query")
    app.click_data(text, *word_at)
    app.wait_until(lambda: app.figure(text)["title"].startswith(f"{text} {word.token}:"), what="the word again")
    again = settled(app, text)
    np.testing.assert_array_equal(again, first_word, err_msg="a clicked token kept a selection style")
    assert app.errors == []


def test_every_colorbar_has_readable_tick_labels_inside_its_plot(app: AppPage) -> None:
    app.open()
    app.page.get_by_text("show the head mean too", exact=True).click()  # the label text toggles it
    app.wait_for_figure("layer 2, mean of heads")
    seen = []
    for tab in ("Attention", "Relevancy", "Compare heads"):
        app.page.get_by_text(tab, exact=True).click()
        time.sleep(2.5)
        for colorbar in app.colorbars():
            labels = colorbar["labels"]
            assert len(labels) >= 2, colorbar
            assert all(NUMBER.match(label) and len(label) <= 9 for label in labels), colorbar
            assert len(set(labels)) == len(labels), colorbar
            assert colorbar["left"] >= 0 and colorbar["right"] <= colorbar["width"] + 1, colorbar
            assert colorbar["bottom"] <= colorbar["height"] + 1, colorbar
            seen.append(colorbar["plot"])
    assert len(seen) >= 7, seen  # summary, image, matrix, mean, text; relevancy maps; compared head
    assert app.errors == []


def test_the_head_mean_is_inside_the_viewport(app: AppPage) -> None:
    app.open()
    app.page.get_by_text("show the head mean too", exact=True).click()
    mean = app.wait_for_figure("layer 2, mean of heads")
    assert mean["left"] >= 0 and mean["left"] + mean["width"] <= 1600
    assert mean["top"] >= 0 and mean["top"] + mean["height"] <= 1000


@pytest.fixture(scope="module")
def demo_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The dashboard served on each shipped demo store."""
    from contextlib import ExitStack

    logs = tmp_path_factory.mktemp("demo-logs")
    with ExitStack() as stack:
        urls = {}
        for name in DEMO_STORES:
            store = REPO / "datasets" / name
            url, _ = stack.enter_context(served(lambda port, s=store: panel_serve_command(s, port), logs / name))
            urls[name] = url
        yield urls


@pytest.mark.parametrize("name", DEMO_STORES)
def test_the_first_screen_of_each_demo_store_shows_a_map_on_the_image(
    browser: object, demo_urls: dict[str, str], name: str
) -> None:
    ds = open_dataset(REPO / "datasets" / name)
    question = str(ds.text.values[0])
    with app_page(browser, demo_urls[name]) as app:
        app.open()
        image = app.wait_for_figure(question[:12])
        colorbars = [c for c in app.colorbars() if c["plot"] == image["title"]]
        assert colorbars and float(colorbars[0]["labels"][-1]) > 0, "the image map is empty (no colorbar)"
        figures = app.figures()
        assert all(f["left"] + f["width"] <= 1600 and f["top"] + f["height"] <= 1000 for f in figures), figures
        assert app.errors == []


def test_every_sidebar_control_fits_the_sidebar(app: AppPage) -> None:
    """Panel's default widget width (300 px) widened the sidebar's column past its 280 px, and the search box,
    the example list, the layer slider and the token movie's buttons ran under its edge, cut."""
    app.open()
    app.page.wait_for_timeout(1000)
    overflow = app.page.evaluate(
        "() => { const n = document.querySelector('.sidenav'); return n.scrollWidth - n.clientWidth; }"
    )
    assert overflow <= 2, f"the sidebar's content is {overflow} px wider than the sidebar"


def test_nothing_is_off_screen_sideways_at_1280_by_800(browser: object, app_url: str) -> None:
    with app_page(browser, app_url, {"width": 1280, "height": 800}) as app:
        app.open()
        time.sleep(1.5)
        assert all(f["left"] >= 0 and f["left"] + f["width"] <= 1280 for f in app.figures()), app.figures()


@pytest.fixture(scope="module")
def numeric_ids_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A store whose example ids are numbers written as text ("0", "1", ...), as imported stores have."""
    spec = SynthSpec(examples=4, layers=2, heads=2, tokens=20, hidden_size=8, image_size=32, seed=9)
    records = [synthetic_record(spec, index) for index in range(4)]
    for index, record in enumerate(records):
        record.example_id = str(index)
    path = tmp_path_factory.mktemp("numeric") / "store"
    write_shard(records_to_dataset(records, spec.model_info()), path)
    logs = tmp_path_factory.mktemp("numeric-log") / "serve.log"
    with served(lambda port: panel_serve_command(path, port), logs) as (url, _):
        yield url


def test_a_shared_link_opens_a_numeric_example_id(browser: object, numeric_ids_url: str) -> None:
    with app_page(browser, numeric_ids_url) as app:
        app.open("?example=3&layer=0&head=1")
        app.wait_for_figure("layer 0, head 1")
        time.sleep(1)
        assert "does not fit" not in app.page.content()
        assert "?example=3" in app.page.url or "example=3" in app.page.url
        summary = app.figure("cross_modal")
        assert " 3 " in f" {summary['title'].split('·')[1]} "
        assert app.errors == []
