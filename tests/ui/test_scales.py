"""Colour scales: explicit ranges, all-zero maps, the overlay palette, and each store's first screen."""

from __future__ import annotations

import itertools
from pathlib import Path

import holoviews as hv
import numpy as np
import pytest

from vlinterpret_panel import open_dataset
from vlinterpret_panel.relevancy.targets import split_entry
from vlinterpret_panel.schema import IMAGE, TEXT
from vlinterpret_panel.ui.attention import token_names
from vlinterpret_panel.ui.dashboard import Dashboard
from vlinterpret_panel.ui.scales import map_scale, overlay_palette, signed_overlay_palette
from vlinterpret_panel.ui.selection import Selection

DATASETS = Path(__file__).resolve().parents[2] / "datasets"


def test_scales_are_explicit_and_say_their_top() -> None:
    values = np.array([0.0, 3e-5, 1e-5, np.nan])
    per_map = map_scale(values, "per map")
    assert per_map.clim == (0.0, 3e-5) and "3e-05" in per_map.label("attention")
    assert map_scale(values, "fixed").clim == (0.0, 1.0)
    assert map_scale(values, "shared", shared_with=[np.array([0.5])]).clim == (0.0, 0.5)
    zero = map_scale(np.zeros(4), "per map")
    assert zero.all_zero and zero.options("attention")["colorbar"] is False
    with pytest.raises(ValueError, match="scale"):
        map_scale(values, "autoscale")


def test_the_overlay_is_transparent_at_zero_and_most_opaque_at_the_top() -> None:
    palette = overlay_palette(0.8)
    alphas = [int(color[-2:], 16) for color in palette]
    assert alphas[0] == 0 and alphas[-1] == round(0.8 * 255)
    assert all(a <= b for a, b in itertools.pairwise(alphas))


def test_a_map_with_negative_values_gets_a_symmetric_signed_scale() -> None:
    # AttnLRP's relevancy is signed: -0.8 must be as visible as +0.8, not clipped under a (0, top) scale.
    values = np.array([-0.8, 0.2, 0.0, np.nan])
    scale = map_scale(values, "per map")
    assert scale.signed and scale.clim == (-0.8, 0.8) and "±0.8" in scale.label("relevancy")
    assert map_scale(values, "shared", shared_with=[np.array([1.5])]).clim == (-1.5, 1.5)
    assert map_scale(values, "fixed").clim == (-1.0, 1.0)
    assert not map_scale(np.array([0.0, 0.3]), "per map").signed


def test_the_signed_overlay_is_transparent_at_zero_and_opaque_at_both_ends() -> None:
    palette = signed_overlay_palette(0.8)
    alphas = [int(color[-2:], 16) for color in palette]
    middle = len(palette) // 2
    assert alphas[middle] == 0 and alphas[0] == alphas[-1] == round(0.8 * 255)
    red, blue = (
        (int(palette[-1][1:3], 16), int(palette[-1][5:7], 16)),
        (int(palette[0][1:3], 16), int(palette[0][5:7], 16)),
    )
    assert red[0] > red[1] and blue[1] > blue[0]  # red above 0, blue below


def _heat_options(overlay: hv.Overlay) -> tuple[dict, dict]:
    (heat,) = [element for element in overlay.values() if type(element) is hv.Image]  # hv.RGB is an Image too
    return hv.Store.lookup_options("bokeh", heat, "plot").kwargs, hv.Store.lookup_options("bokeh", heat, "style").kwargs


def test_the_relevancy_view_paints_attnlrp_signed_and_generic_one_sided() -> None:
    from vlinterpret_panel.ui.relevancy import RelevancyView

    hv.extension("bokeh")
    ds = open_dataset(DATASETS / "single_stream")
    image = ds.modality.isel(example=4).values == IMAGE
    stored = ds.relevancy.isel(example=4).sel(relevancy_method="attnlrp").values[image]
    assert stored.min() < 0 < stored.max()  # the shipped store's AttnLRP map has both signs
    example = str(ds.example.values[4])
    plot, style = _heat_options(RelevancyView._image_with(ds, example, "attnlrp", False, "per map", 0.7))
    top = float(np.abs(stored).max())
    assert plot["clim"] == pytest.approx((-top, top), rel=1e-3) and "(±" in plot["clabel"]
    assert style["cmap"][0].startswith("#2") and style["cmap"][len(style["cmap"]) // 2].endswith("00")
    plot, style = _heat_options(RelevancyView._image_with(ds, example, "generic", False, "per map", 0.7))
    assert plot["clim"][0] == 0.0 and "(0 to " in plot["clabel"]


@pytest.mark.parametrize(
    ("store", "layer_kind", "modality"),
    [
        ("single_stream", "self", TEXT),
        ("dual_stream", "cross_text_to_image", TEXT),
        ("dual_encoder", "image_self", None),
    ],
)
def test_each_demo_store_opens_on_a_token_that_attends_the_image(store: str, layer_kind: str, modality: str) -> None:
    ds = open_dataset(DATASETS / store)
    selection = Selection.for_dataset(ds)
    assert str(ds.layer_kind.values[selection.layer]) == layer_kind
    info = ds.vli.tokens(selection.example)
    (token,) = selection.tokens
    if modality is not None:
        assert info.modality[token] == modality
    row = ds.vli.token_attention(selection.example, selection.layer, None, token).values
    assert row[info.tokens_of(IMAGE)].sum() > 0.01  # the first screen's image map is not empty
    # The best stored map's method (a "METHOD [TARGET]" entry opens on its method).
    assert selection.relevancy_method == split_entry(ds.vli.best_relevancy_method())[0]
    assert selection.statistic == ("intra_modal" if store == "dual_encoder" else "cross_modal")


def test_the_matrix_hover_names_the_tokens_of_the_shown_example() -> None:
    ds = open_dataset(DATASETS / "single_stream")
    dashboard = Dashboard(ds)
    plot = hv.renderer("bokeh").get_plot(dashboard.attention._matrix_plot)

    def hover_names() -> list[str]:
        (hover,) = [tool for tool in plot.state.tools if type(tool).__name__ == "HoverTool"]
        return hover.formatters["$x"].args["names"]

    assert hover_names() == token_names(ds.vli.tokens(dashboard.selection.example).token_text)
    other = str(ds.example.values[5])
    dashboard.selection.select(example=other)
    assert hover_names() == token_names(ds.vli.tokens(other).token_text)
