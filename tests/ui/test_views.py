"""The views without a browser: linked selection, one coordinate convention, filters, summary table, export."""

from __future__ import annotations

import io
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import colorcet
import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import pytest
import xarray as xr

from vlinterpret_panel import neighbors, open_dataset
from vlinterpret_panel.accessor import VLIAccessor
from vlinterpret_panel.maps import example_tokens
from vlinterpret_panel.schema import IMAGE, TEXT
from vlinterpret_panel.ui import embedding, head_summary
from vlinterpret_panel.ui.dashboard import Dashboard
from vlinterpret_panel.ui.export import current_view_table
from vlinterpret_panel.ui.head_summary import MEAN_COLUMN, summary_table
from vlinterpret_panel.ui.text import token_layout


@pytest.fixture(scope="module")
def ds(relevancy_store: Path) -> xr.Dataset:
    return open_dataset(relevancy_store)


@pytest.fixture
def dashboard(ds: xr.Dataset) -> Dashboard:
    return Dashboard(ds)


def test_default_selection_fits_the_store_with_no_hard_coded_head(dashboard: Dashboard, ds: xr.Dataset) -> None:
    selection = dashboard.selection
    assert selection.layer == ds.sizes["layer"] - 1 and selection.head is None
    first = example_tokens(ds, selection.example)
    assert first.modality[selection.tokens[0]] == TEXT


def test_every_view_maps_a_tap_to_the_same_token_with_row_zero_at_the_top(dashboard: Dashboard, ds: xr.Dataset) -> None:
    info = example_tokens(dashboard.ds, dashboard.selection.example)
    for patch in info.image_tokens()[[0, -1]]:
        x0, y0, x1, y1 = info.token_box[patch]
        dashboard.image.tap.event(x=(x0 + x1) / 2, y=(y0 + y1) / 2)
        assert dashboard.selection.tokens == [patch]
        dashboard.attention.tap.event(x=0.5, y=patch + 0.5)  # the heatmap's row of that query
        assert dashboard.selection.tokens == [patch]
    layout = token_layout(info)
    word = layout[np.isin(layout.token, info.tokens_of(TEXT))].iloc[-1]
    dashboard.text.tap.event(x=(word.x0 + word.x1) / 2, y=(word.y0 + word.y1) / 2)
    assert dashboard.selection.tokens == [int(word.token)]
    top_left = info.image_tokens()[np.argmin(info.token_box[info.image_tokens(), :2].sum(axis=1))]
    assert info.token_at(0.5, 0.5) == top_left


def test_head_summary_tap_selects_a_head_or_the_mean(dashboard: Dashboard) -> None:
    dashboard.head_summary.tap.event(x="1", y="0")
    assert (dashboard.selection.layer, dashboard.selection.head) == (0, 1)
    dashboard.head_summary.tap.event(x=MEAN_COLUMN, y="2")
    assert (dashboard.selection.layer, dashboard.selection.head) == (2, None)


def test_summary_table_has_a_mean_column_and_raw_values_beside_zscores(ds: xr.Dataset) -> None:
    example = str(ds.example.values[0])
    table = summary_table(ds, "cross_modal", "example", example, [], "zscore")
    assert set(table["head"]) == {*map(str, range(ds.sizes["head"])), MEAN_COLUMN}
    assert table["value"].abs().max() <= 3.0
    raw = ds.vli.head_summary("cross_modal", example=example)
    cell = table[(table.layer == "1") & (table["head"] == "2")].iloc[0]
    assert cell.raw == pytest.approx(float(raw.sel(layer=1, head=2)))
    means = table[table["head"] == MEAN_COLUMN].set_index("layer")["raw"]
    assert means["1"] == pytest.approx(float(raw.sel(layer=1).mean()))
    subset = list(ds.example.values[:3])
    filtered = summary_table(ds, "cross_modal", "filtered", example, subset, "raw")
    assert not np.allclose(filtered["value"], summary_table(ds, "cross_modal", "dataset", example, [], "raw")["value"])


def test_example_browser_filters_and_steps_through_matches(dashboard: Dashboard, ds: xr.Dataset) -> None:
    browser = dashboard.examples
    word = str(ds.text.values[2]).split()[0]
    browser.search = word
    matching = browser.matching()
    assert len(matching) >= 1 and all(word in text for text in matching["text"])
    assert dashboard.selection.subset == list(matching.index)
    browser.search, browser.correct = "", "correct"
    assert set(browser.matching()["correct"]) == {"correct"}
    ids = list(browser.matching().index)
    dashboard.selection.example = ids[0]
    browser.step(+1)
    assert dashboard.selection.example == ids[1 % len(ids)]


def test_export_holds_the_data_behind_the_view(dashboard: Dashboard, ds: xr.Dataset, tmp_path: Path) -> None:
    selection = dashboard.selection
    selection.param.update(layer=1, head=0)
    downloaded = tmp_path / "view.nc"
    downloaded.write_bytes(dashboard.export._netcdf().getvalue())
    data = xr.open_dataset(downloaded)
    np.testing.assert_allclose(data["attention"].values, ds.vli.attention_map(selection.example, 1, 0).values)
    assert data.attrs["example"] == selection.example and data.attrs["head"] == 0
    table = pd.read_csv(io.BytesIO(dashboard.export._csv().getvalue()))
    assert len(table) == example_tokens(ds, selection.example).n_tokens
    expected = current_view_table(ds, selection)
    pd.testing.assert_frame_equal(table, expected, check_dtype=False, rtol=1e-6)


def test_a_bad_selection_shows_a_message_not_a_traceback(dashboard: Dashboard) -> None:
    dashboard.selection.relevancy_method = "no-such-method"
    example = dashboard.selection.example
    dashboard.relevancy._on_image(example, "no-such-method", "", "", False, "per map", 0.8, dashboard.ds)
    assert "no-such-method" in dashboard.selection.message


def test_lasso_of_patches_selects_them_all(dashboard: Dashboard) -> None:
    info = example_tokens(dashboard.ds, dashboard.selection.example)
    dashboard.image.lasso.event(index=[0, 1, 2])
    assert dashboard.selection.tokens == sorted(info.image_tokens()[:3].tolist())
    assert all(info.modality[t] == IMAGE for t in dashboard.selection.tokens)


@pytest.fixture
def uncached_ds(relevancy_store: Path, tmp_path: Path) -> xr.Dataset:
    """A copy of the UI store without its cache: every dataset-wide result is still to compute."""
    store = tmp_path / "store"
    shutil.copytree(relevancy_store, store, ignore=shutil.ignore_patterns(".cache"))
    return open_dataset(store)


def _held_in_background(
    monkeypatch: pytest.MonkeyPatch, module: object, method: str
) -> tuple[threading.Event, threading.Event, Callable]:
    """Make ``module`` run every store in the background and hold ``ds.vli.<method>`` until released.

    Returns (release, started, the original method).
    """
    monkeypatch.setattr(module, "BACKGROUND_ABOVE_BYTES", 0)
    release, started = threading.Event(), threading.Event()
    original = getattr(VLIAccessor, method)

    def held(*args: object) -> object:
        started.set()
        assert release.wait(60)
        return original(*args)

    monkeypatch.setattr(VLIAccessor, method, held)
    return release, started, original


def test_a_large_store_summary_computes_in_the_background_once_for_all_sessions(
    uncached_ds: xr.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = uncached_ds
    release, started, _ = _held_in_background(monkeypatch, head_summary, "compute_stats")
    sessions = [Dashboard(ds), Dashboard(ds)]
    example = str(ds.example.values[0])
    try:
        for session in sessions:
            session.selection.scope = "dataset"
            summary = session.head_summary
            hv.renderer("bokeh").get_plot(summary._heatmap * summary._marker)  # the page's plot, following the streams
        assert started.wait(30)
        waiting = [session.head_summary._heatmap.last for session in sessions]
        assert all("computing statistics of" in w.opts.get().kwargs["title"] and len(w) == 0 for w in waiting)
        pending = {id(s.head_summary.redraw.waiting_for) for s in sessions}
        assert len(pending) == 1 and None not in {s.head_summary.redraw.waiting_for for s in sessions}
        answered = sessions[0].head_summary._summary("cross_modal", "example", example, [], "raw", ds)
        assert len(answered) > 0  # other summaries still answer
        sessions[0].head_summary.redraw.check()
        assert sessions[0].head_summary.redraw.waiting_for is not None  # not done: nothing redrawn yet
    finally:
        release.set()
    sessions[0].head_summary.redraw.waiting_for.result(timeout=60)
    for session in sessions:
        session.head_summary.redraw.check()
        assert session.head_summary.redraw.waiting_for is None and session.head_summary.redraw._poller is None
        redrawn = session.head_summary._heatmap.last  # a new frame, not the cached placeholder
        assert "all examples" in redrawn.opts.get().kwargs["title"]
    expected = summary_table(ds, "cross_modal", "dataset", example, [], "raw")
    np.testing.assert_allclose(redrawn.data["value"], expected["value"])


def test_the_embedding_previews_the_token_under_the_pointer_only_when_near_one(
    dashboard: Dashboard, ds: xr.Dataset
) -> None:
    view, selection = dashboard.embedding, dashboard.selection
    table = ds.vli.projection_table(selection.hidden_layer)
    mine = table[table["example"] == selection.example]
    token = mine[mine["modality"] == IMAGE].iloc[-1]
    view.pointer.event(x=float(token.x), y=float(token.y))
    assert view.hovered == int(token.token)
    preview = view._preview[()]
    assert preview.opts.get().kwargs["title"].startswith(f"hover: {token.token_text}")
    outline = preview.get(2).data  # the dashed box under the pointer, on the image
    box = example_tokens(ds, selection.example).token_box[int(token.token)]
    np.testing.assert_allclose(outline[["x0", "y0", "x1", "y1"]].to_numpy()[0], box)
    far = float(table["x"].max() + (table["x"].max() - table["x"].min()))
    view.pointer.event(x=far, y=float(token.y))
    assert view.hovered is None
    view.pointer.event(x=float(token.x), y=float(token.y))
    selection.hidden_layer = 0 if selection.hidden_layer else 1  # another map: the old position means nothing
    assert view.hovered is None


def test_a_large_store_layer_map_computes_in_the_background_and_the_view_redraws(
    uncached_ds: xr.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = uncached_ds
    release, started, compute = _held_in_background(monkeypatch, embedding, "projection_table")
    sessions = [Dashboard(ds), Dashboard(ds)]
    views = [session.embedding for session in sessions]
    try:
        for view in views:
            hv.renderer("bokeh").get_plot(view._cloud_plot * view._current)  # the page's plot
        assert started.wait(30)
        assert len({id(view.redraw.waiting_for) for view in views}) == 1 and views[0].redraw.waiting_for is not None
        assert views[0]._status.visible and "Computing the map of hidden layer" in views[0]._status.object
        assert len(views[0]._current.last.get(0)) == 0  # no tokens drawn yet
        layer, example = sessions[0].selection.hidden_layer, sessions[0].selection.example
        tokens = list(sessions[0].selection.tokens)
        views[0]._tapped(0.0, 0.0)  # taps and hovers wait for the map
        views[0]._pointed(0.0, 0.0)
        assert sessions[0].selection.tokens == tokens and views[0].hovered is None
    finally:
        release.set()
    views[0].redraw.waiting_for.result(timeout=60)
    table = compute(ds.vli, layer)
    for view in views:
        view.redraw.check()
        assert view.redraw.waiting_for is None and not view._status.visible
        mine = table[table["example"] == example]
        assert len(view._current.last.get(0)) == len(mine)  # redrawn with the map, not the placeholder
        x0, x1 = view._cloud_plot.last.range("x")
        assert x0 <= table["x"].min() and table["x"].max() <= x1


@pytest.mark.parametrize("color_by", ["modality", "label", "example"])
def test_the_embedding_legend_names_the_map_categories_in_datashaders_colours(
    dashboard: Dashboard, ds: xr.Dataset, color_by: str
) -> None:
    table = ds.vli.projection_table(dashboard.selection.hidden_layer)
    categories = list(table[color_by].astype(str).astype("category").cat.categories)
    assert embedding.cloud_categories(ds, color_by) == categories  # what the placeholder and legend use
    legend = dashboard.embedding.legend(color_by)
    for name, color in list(zip(categories, colorcet.glasbey, strict=False))[: embedding.LEGEND_ENTRIES]:
        assert f'color:{color}">&#9679;</span> {name}<' in legend
    assert ("more" in legend) == (len(categories) > embedding.LEGEND_ENTRIES)


def test_the_first_nearest_token_search_of_a_large_layer_reads_it_in_the_background(
    uncached_ds: xr.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = uncached_ds
    monkeypatch.setattr(neighbors, "fits_in_memory", lambda ds: False)  # a layer too large to hold: copied first
    release, started, _ = _held_in_background(monkeypatch, embedding, "prepare_search")
    view = Dashboard(ds).embedding
    selection = view.selection
    args = (selection.example, [1], selection.hidden_layer)
    try:
        waiting = view.neighbours(*args)
        assert started.wait(30)
        assert "Reading hidden layer" in waiting.object and view.neighbours_redraw.waiting_for is not None
    finally:
        release.set()
    view.neighbours_redraw.waiting_for.result(timeout=60)
    counter = view.neighbours_redraw.stream.counter
    view.neighbours_redraw.check()
    assert view.neighbours_redraw.stream.counter == counter + 1  # the bound table redraws
    table = view.neighbours(*args).object
    expected = ds.vli.nearest_tokens(selection.example, 1, selection.hidden_layer)
    columns = ["example", "token", "distance"]
    assert len(table) == 10 and table[columns].equals(expected[columns])


def test_a_grown_store_is_a_param_update_not_a_rebuild(ds: xr.Dataset) -> None:
    smaller = ds.isel(example=slice(0, 3))
    dashboard = Dashboard(smaller)
    views = list(dashboard.views)
    heatmap = dashboard.head_summary._heatmap
    dashboard.selection.select(layer=1, head=0)
    new_id = str(ds.example.values[-1])
    dashboard.show_store(ds, example=new_id)
    assert dashboard.views == views and dashboard.head_summary._heatmap is heatmap  # nothing rebuilt
    assert all(view.ds is ds for view in views)
    assert dashboard.selection.example == new_id and (dashboard.selection.layer, dashboard.selection.head) == (1, 0)
    assert dashboard.selection.param.example.objects == [str(i) for i in ds.example.values]
    assert new_id in dashboard.examples._choice.options.values()
    assert dashboard.image._picture(new_id, dashboard.ds).data.shape[:2] == ds.vli.tokens(new_id).image.shape[:2]


def test_batched_clicks_keep_the_documents_model_registry_exact(ds: xr.Dataset) -> None:
    """``batched`` skips Bokeh's model walk when nothing asked for it: the registry must still be exact."""
    from bokeh.document import Document
    from panel.io.state import set_curdoc

    dashboard = Dashboard(ds)
    document = Document()
    document.add_root(pn.Row(pn.Column(*dashboard.sidebar()), dashboard.main()).get_root(document))
    info = ds.vli.tokens(dashboard.selection.example)
    with set_curdoc(document):
        dashboard.head_summary.tap.event(x="1", y="0")
        x0, y0, x1, y1 = info.token_box[info.image_tokens()[2]]
        dashboard.image.tap.event(x=(x0 + x1) / 2, y=(y0 + y1) / 2)
        dashboard.selection.select(example=str(ds.example.values[3]))
        dashboard.attention.show_mean = True
        dashboard.selection.select(layer=2, head=None, tokens=[1])
    reachable = set().union(*(root.references() for root in document.roots))
    assert {model.id for model in reachable} == set(document.models._models)
    assert "invalidate" not in vars(document.models) and document.models._freeze_count == 0


def test_the_layer_slider_is_linked_both_ways_and_moves_in_one_model_walk(ds: xr.Dataset, monkeypatch) -> None:
    """The layer slider sets the selection inside ``batched``: one walk over the page's models, not one a plot."""
    from bokeh.document import Document
    from panel.io.state import set_curdoc

    dashboard = Dashboard(ds)
    slider = dashboard.tokens._layer
    assert (slider.start, slider.end, slider.value) == (0, ds.sizes["layer"] - 1, dashboard.selection.layer)
    document = Document()
    document.add_root(pn.Row(pn.Column(*dashboard.sidebar()), dashboard.main()).get_root(document))
    walks = []
    recompute = document.models.recompute
    monkeypatch.setattr(document.models, "recompute", lambda: walks.append(1) or recompute())
    with set_curdoc(document):
        slider.value = (dashboard.selection.layer + 1) % ds.sizes["layer"]
    assert dashboard.selection.layer == slider.value
    assert len(walks) <= 1
    dashboard.selection.select(layer=0)
    assert slider.value == 0
    dashboard.selection.param.layer.bounds = (0, 1)
    assert (slider.start, slider.end) == (0, 1)


def test_batched_widgets_take_a_selectors_options_and_a_numbers_bounds(ds: xr.Dataset) -> None:
    from vlinterpret_panel.ui.scales import SCALES
    from vlinterpret_panel.ui.selection import batched_widget

    selection = Dashboard(ds).selection
    scale = batched_widget(pn.widgets.Select, selection, "scale", label="colour range")
    opacity = batched_widget(pn.widgets.FloatSlider, selection, "opacity", step=0.05)
    assert scale.options == list(SCALES) and (opacity.start, opacity.end) == (0, 1)
    other = next(name for name in SCALES if name != selection.scale)
    scale.value = other
    opacity.value = 0.3
    assert (selection.scale, selection.opacity) == (other, 0.3)
    first = next(iter(SCALES))
    selection.param.update(scale=first, opacity=0.9)
    assert (scale.value, opacity.value) == (first, 0.9)
