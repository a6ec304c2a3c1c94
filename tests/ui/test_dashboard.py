"""The dashboard in a real browser: loading, linked clicks, the embedding slider and shareable URLs."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from tests.ui.browser import AppPage
from tests.ui.conftest import changed_fraction
from vlinterpret_panel import open_dataset
from vlinterpret_panel.maps import example_tokens
from vlinterpret_panel.schema import IMAGE, TEXT
from vlinterpret_panel.ui.text import token_layout

pytestmark = pytest.mark.browser

SUMMARY = "cross_modal"  # the head summary's title starts with its statistic
HEATMAP = "layer "
IMAGE_OVERLAY_FRACTION = 0.05


def _query(app: AppPage) -> dict[str, str]:
    return {
        key: values[0] for key, values in parse_qs(urlparse(app.page.evaluate("window.location.href")).query).items()
    }


def test_app_loads_every_view_without_console_errors(app: AppPage) -> None:
    app.open()
    for prefix in (SUMMARY, HEATMAP, "attention from"):
        app.wait_for_figure(prefix)
    app.page.wait_for_timeout(1000)
    assert app.errors == []


def test_tapping_a_head_summary_cell_updates_the_attention_heatmap(app: AppPage) -> None:
    app.open()
    app.wait_for_figure(SUMMARY)
    before = app.pixels(HEATMAP)
    app.click_data(SUMMARY, "1", "0")
    app.wait_for_figure("layer 0, head 1")
    app.wait_until(lambda: changed_fraction(before, app.pixels(HEATMAP)) > 0.05, what="the heatmap to change")
    app.wait_until(lambda: _query(app).get("layer") == "0" and _query(app).get("head") == "1", what="the URL")
    app.click_data(SUMMARY, "mean", "2")
    app.wait_for_figure("layer 2, mean of heads")
    app.wait_until(lambda: _query(app).get("head") == "mean", what="the URL to say head=mean")
    assert app.errors == []


def test_tapping_a_text_token_changes_the_image_overlay(app: AppPage, relevancy_store: Path) -> None:
    ds = open_dataset(relevancy_store)
    example = str(ds.example.values[0])
    info = example_tokens(ds, example)
    app.open(f"?example={example}")
    title = info.text[:20]
    app.wait_for_figure(title)
    before = app.pixels(title)
    layout = token_layout(info)
    selected = int(info.tokens_of(TEXT)[0])
    target = layout[(layout.token != selected) & np.isin(layout.token, info.tokens_of(TEXT))].iloc[-1]
    app.click_data("attention from", float((target.x0 + target.x1) / 2), float((target.y0 + target.y1) / 2))
    token = int(target.token)
    app.wait_for_figure(f"attention from {token}:")
    app.wait_until(
        lambda: changed_fraction(before, app.pixels(title)) > IMAGE_OVERLAY_FRACTION, what="the overlay to change"
    )
    # The overlay covers the image most where the token attends most (same row-0-at-top convention in both
    # views): there the shown pixel is farthest from the image's own pixel; where it attends least, nearest.
    app.page.wait_for_timeout(500)
    after = app.pixels(title)
    layer = ds.sizes["layer"] - 1
    painted = ds.vli.token_attention_on_image(example, layer, None, token).values
    patches = info.image_tokens()
    values = [
        painted[
            int((info.token_box[p, 1] + info.token_box[p, 3]) / 2),
            int((info.token_box[p, 0] + info.token_box[p, 2]) / 2),
        ]
        for p in patches
    ]
    height, width = info.image.shape[:2]

    def covered(position: int) -> float:
        x0, y0, x1, y1 = info.token_box[position]
        y, x = int((y0 + y1) / 2), int((x0 + x1) / 2)
        shown = after[int(y / height * after.shape[0]), int(x / width * after.shape[1])]
        return float(np.abs(shown - info.image[y, x].astype(np.int16)).sum())

    assert covered(patches[int(np.argmax(values))]) > covered(patches[int(np.argmin(values))]) + 60
    assert app.errors == []


def test_tapping_an_image_patch_makes_it_the_query(app: AppPage, relevancy_store: Path) -> None:
    ds = open_dataset(relevancy_store)
    example = str(ds.example.values[1])
    info = example_tokens(ds, example)
    app.open(f"?example={example}")
    title = info.text[:20]
    app.wait_for_figure(title)
    patch = int(info.image_tokens()[-1])  # bottom-right patch: row 0 is the top in every view
    x0, y0, x1, y1 = info.token_box[patch]
    app.click_data(title, float((x0 + x1) / 2), float((y0 + y1) / 2))
    app.wait_for_figure(f"attention from {patch}:")
    app.wait_until(lambda: _query(app).get("tokens") == f"[{patch}]", what="the URL to name the patch")


def test_layer_slider_changes_the_embedding_view(app: AppPage) -> None:
    app.open()
    app.page.get_by_text("Embeddings", exact=True).click()
    app.wait_for_figure("hidden layer")
    title_before = app.figure("hidden layer")["title"]
    before = app.pixels("hidden layer")
    player = app.page.locator(".bk-panel-models-widgets-Player").filter(has_text="hidden layer")
    player.locator("button.previous").click()  # the "hidden layer" player's step back
    app.wait_until(lambda: app.figure("hidden layer")["title"] != title_before, what="the layer in the title")
    app.wait_until(lambda: changed_fraction(before, app.pixels("hidden layer")) > 0.01, what="the cloud to change")
    assert app.errors == []


def test_hovering_a_token_in_the_embedding_outlines_it_on_the_image(app: AppPage, relevancy_store: Path) -> None:
    ds = open_dataset(relevancy_store)
    example = str(ds.example.values[2])
    app.open(f"?example={example}")
    app.page.get_by_text("Embeddings", exact=True).click()
    layer = int(app.wait_for_figure("hidden layer")["title"].split()[2])
    app.wait_for_figure("selected:")
    mine = ds.vli.projection_table(layer).query("example == @example").reset_index(drop=True)
    points = mine[["x", "y"]].to_numpy()
    gaps = np.hypot(*(points[:, None] - points[None]).transpose(2, 0, 1)) + np.eye(len(points)) * 1e9
    patches = mine.index[mine["modality"] == IMAGE]
    patch = mine.loc[patches[np.argmax(gaps[patches].min(axis=1))]]  # the image token farthest from the others
    before = app.pixels("selected:")
    x, y = app.data_position("hidden layer", float(patch.x), float(patch.y))
    app.page.mouse.move(x - 40, y - 40)
    app.page.mouse.move(x, y, steps=4)
    app.wait_for_figure(f"hover: {patch.token_text}")
    app.wait_until(lambda: changed_fraction(before, app.pixels("hover:")) > 0.005, what="the outline on the image")
    app.page.mouse.move(x + 2000, y, steps=2)  # off the map: the preview keeps the last hovered token
    assert app.figure("hover:")["title"] == f"hover: {patch.token_text}"
    assert app.errors == []


def test_a_url_with_state_reopens_that_state(app: AppPage, relevancy_store: Path) -> None:
    ds = open_dataset(relevancy_store)
    example = str(ds.example.values[3])
    token = int(example_tokens(ds, example).tokens_of(TEXT)[2])
    app.open(f"?example={example}&layer=1&head=2&tokens=[{token}]")
    app.wait_for_figure("layer 1, head 2")
    app.wait_for_figure(f"attention from {token}:")
    app.wait_for_figure(example_tokens(ds, example).text[:20])
    assert app.page.get_by_text(example, exact=True).count() >= 1
    query = _query(app)
    assert (query["example"], query["layer"], query["head"], query["tokens"]) == (example, "1", "2", f"[{token}]")
    app.open(f"?example={example}&layer=2&head=mean&tokens=[{token}]&hidden=1")
    app.wait_for_figure("layer 2, mean of heads")
    app.wait_for_figure(f"attention from {token}:")
    assert app.errors == []


def test_a_bare_link_gets_the_state_shown_in_its_url(app: AppPage, relevancy_store: Path) -> None:
    """The page's URL names what it shows from the start, so a link copied before any click reopens it."""
    app.open()
    app.wait_for_figure(HEATMAP)
    app.wait_until(lambda: {"example", "layer", "head", "tokens"} <= set(_query(app)), what="the state in the URL")
    query = _query(app)
    assert query["example"] == str(open_dataset(relevancy_store).example.values[0])
    head = "mean of heads" if query["head"] == "mean" else f"head {query['head']}"
    assert app.figure(HEATMAP)["title"].startswith(f"layer {query['layer']}, {head}")


def test_relevancy_view_shows_each_method(app: AppPage) -> None:
    app.open()
    app.page.get_by_text("Relevancy", exact=True).click()
    app.wait_for_figure("rollout")
    app.wait_for_figure("text relevancy for")
    assert app.errors == []


def test_a_link_to_an_unknown_example_shows_a_message_and_the_defaults(app: AppPage) -> None:
    app.open("?example=not-in-this-store&layer=1")
    app.wait_until(lambda: app.page.get_by_text("does not fit this store").count() > 0, what="the message")
    assert app.errors == []
