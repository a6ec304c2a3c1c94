"""Attention maps of one example: trimming, head mean, a token's row or column, maps on the image (row 0 = top)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from vlinterpret_panel import VLIError, open_dataset
from vlinterpret_panel.maps import attention_map, example_tokens, token_attention, values_on_image


@pytest.fixture(scope="module")
def ds(small_store: Path) -> xr.Dataset:
    return open_dataset(small_store)


def test_attention_map_is_trimmed_and_head_none_is_the_mean(ds: xr.Dataset) -> None:
    example = 5
    n_tokens = int(ds.seq_len[example])
    raw = ds.attention.isel(example=example, layer=1).values[:, :n_tokens, :n_tokens]
    one_head = ds.vli.attention_map(ds.example.values[example], 1, 1)
    assert one_head.shape == (n_tokens, n_tokens)
    np.testing.assert_allclose(one_head.values, raw[1])
    np.testing.assert_allclose(attention_map(ds, example, 1, None).values, raw.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(one_head.sum("key").values, 1.0, atol=1e-3)
    assert list(one_head.query_modality.values) == list(ds.modality.values[example, :n_tokens])


def test_token_attention_reads_the_row_or_the_column_and_averages_several(ds: xr.Dataset) -> None:
    matrix = attention_map(ds, 2, 0, 0).values
    np.testing.assert_allclose(token_attention(ds, 2, 0, 0, 4, "from").values, matrix[4])
    np.testing.assert_allclose(token_attention(ds, 2, 0, 0, 4, "to").values, matrix[:, 4])
    np.testing.assert_allclose(token_attention(ds, 2, 0, 0, [3, 7], "from").values, matrix[[3, 7]].mean(axis=0))
    assert token_attention(ds, 2, 0, 0, 4).dims == ("token",)


def test_image_map_puts_each_tokens_value_in_its_box_with_row_zero_at_the_top(ds: xr.Dataset) -> None:
    tokens = example_tokens(ds, 3)
    values = np.arange(tokens.n_tokens, dtype=float)
    painted = values_on_image(ds, 3, values).values
    assert painted.shape == tokens.image.shape[:2]
    patches = tokens.image_tokens()
    top_left = patches[np.argmin(tokens.token_box[patches, 0] + tokens.token_box[patches, 1])]
    bottom_right = patches[np.argmax(tokens.token_box[patches, 2] + tokens.token_box[patches, 3])]
    assert painted[0, 0] == top_left
    assert painted[-1, -1] == bottom_right
    for position in patches:
        x0, y0, x1, y1 = tokens.token_box[position]
        centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
        assert painted[int(centre_y), int(centre_x)] == position
        assert tokens.token_at(centre_x, centre_y) == position
    assert tokens.token_at(-1, -1) is None


def test_accessor_image_map_matches_the_token_row(ds: xr.Dataset) -> None:
    tokens = example_tokens(ds, 1)
    query = int(tokens.tokens_of("text")[0])
    row = attention_map(ds, 1, 2, None).values[query]
    painted = ds.vli.token_attention_on_image(1, 2, None, query, direction="from").values
    for position in tokens.image_tokens():
        x0, y0, x1, y1 = tokens.token_box[position]
        assert painted[int((y0 + y1) / 2), int((x0 + x1) / 2)] == pytest.approx(row[position])


def test_smoothing_interpolates_between_patch_centres(ds: xr.Dataset) -> None:
    tokens = example_tokens(ds, 0)
    rng = np.random.default_rng(0)
    values = rng.uniform(size=tokens.n_tokens)
    smooth = values_on_image(ds, 0, values, smooth=True).values
    patches = tokens.image_tokens()
    assert np.isfinite(smooth).all()
    assert values[patches].min() - 1e-9 <= smooth.min() and smooth.max() <= values[patches].max() + 1e-9
    x0, y0, x1, y1 = tokens.token_box[patches[len(patches) // 2]]
    centre = smooth[round((y0 + y1) / 2 - 0.5), round((x0 + x1) / 2 - 0.5)]
    assert centre == pytest.approx(values[patches[len(patches) // 2]], abs=0.15)
    assert np.abs(np.diff(smooth, axis=1)).max() < np.abs(np.diff(values_on_image(ds, 0, values).values, axis=1)).max()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda ds: attention_map(ds, "no-such-example", 0), "not in this store"),
        (lambda ds: attention_map(ds, 99, 0), "outside"),
        (lambda ds: attention_map(ds, 0, 0, 7), "head 7"),
        (lambda ds: attention_map(ds, 0, 9), "layer 9"),
        (lambda ds: token_attention(ds, 0, 0, 0, 999), "token(s) [999]"),
        (lambda ds: token_attention(ds, 0, 0, 0, 1, "sideways"), "direction"),
    ],
)
def test_bad_selections_raise_one_readable_error(ds: xr.Dataset, call, message: str) -> None:
    with pytest.raises(VLIError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        call(ds)


def test_region_boxes_that_are_not_a_grid_paint_blur_and_pick_the_tightest_box() -> None:
    from vlinterpret_panel.schema import IMAGE, records_to_dataset
    from vlinterpret_panel.synth import SynthSpec, synthetic_record

    spec = SynthSpec(examples=1, layers=1, heads=1, tokens=20, image_size=40, vary_length=False)
    record = synthetic_record(spec, 0)
    regions = np.flatnonzero(np.asarray(record.modality) == IMAGE)
    boxes = np.full_like(record.token_box, np.nan)
    # the whole-image box comes after the small one: painting must still show the small one on top
    boxes[regions] = [(5, 5, 15, 15), *[(20, 20, 30 + i, 30 + i) for i in range(len(regions) - 2)], (0, 0, 40, 40)]
    record.token_box = boxes
    record.patch_position = None
    ds = records_to_dataset([record], spec.model_info())
    tokens = example_tokens(ds, 0)
    assert tokens.token_at(10, 10) == regions[0]  # inside the whole-image box too, but this one is tighter
    assert tokens.token_at(35, 2) == regions[-1]
    values = np.zeros(tokens.n_tokens)
    values[regions[0]] = 1.0
    assert values_on_image(ds, 0, values).values[10, 10] == 1.0
    smooth = values_on_image(ds, 0, values, smooth=True).values
    assert np.isfinite(smooth).all() and 0 < smooth[10, 10] < 1.0 and smooth[10, 10] > smooth[35, 35]
