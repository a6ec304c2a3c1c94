"""Counterfactual edits: the masked region and its fills by hand, the stored link, the comparison, three models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vlinterpret_panel import open_dataset
from vlinterpret_panel.counterfactual import Edit, compare, fill_pixels, image_map, origins
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.extract import extract, scene_sources
from vlinterpret_panel.live import LiveModel

REPO = Path(__file__).resolve().parents[1]


def _image() -> np.ndarray:
    """8 x 8, background (10, 20, 30) with a white 2 x 2 square at rows 2-3, columns 4-5."""
    image = np.zeros((8, 8, 3), dtype=np.uint8) + np.array([10, 20, 30], dtype=np.uint8)
    image[2:4, 4:6] = 255
    return image


def test_a_box_masks_exactly_its_pixels() -> None:
    region = Edit(box=(4, 2, 6, 4)).region(8, 8)
    expected = np.zeros((8, 8), bool)
    expected[2:4, 4:6] = True
    np.testing.assert_array_equal(region, expected)


def test_a_brush_stroke_masks_the_pixels_within_half_its_width() -> None:
    # A horizontal stroke along y = 4.5 from x = 1.5 to 5.5, 2 pixels wide: pixel centres within 1 of the segment.
    region = Edit(strokes=(((1.5, 4.5), (5.5, 4.5)),), brush_width=2.0).region(8, 8)
    rows, cols = np.nonzero(region)
    by_hand = {(r, c) for r in range(8) for c in range(8) if abs(r + 0.5 - 4.5) <= 1 and 1.5 <= c + 0.5 <= 5.5}
    # ... plus the round caps: centres within 1 of an end point.
    by_hand |= {
        (r, c)
        for r in range(8)
        for c in range(8)
        if min((c + 0.5 - x) ** 2 + (r + 0.5 - 4.5) ** 2 for x in (1.5, 5.5)) <= 1
    }
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == by_hand


def test_fills_background_mean_and_blur() -> None:
    image = _image()
    edit = Edit(box=(4, 2, 6, 4))
    background = Edit(box=(4, 2, 6, 4), fill="background").apply(image)
    np.testing.assert_array_equal(background, np.zeros_like(image) + np.array([10, 20, 30], dtype=np.uint8))
    mean = Edit(box=(4, 2, 6, 4), fill="mean").apply(image)
    colour = np.round(image.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    np.testing.assert_array_equal(mean[2:4, 4:6], np.broadcast_to(colour, (2, 2, 3)))
    blurred = Edit(box=(4, 2, 6, 4), fill="blur").apply(image)
    outside = ~edit.region(8, 8)
    np.testing.assert_array_equal(blurred[outside], image[outside])  # only the region changes
    assert (blurred[2:4, 4:6] < 255).all() and (blurred[2:4, 4:6] > image[0, 0]).any()  # a blur, not a fill
    np.testing.assert_array_equal(image, _image())  # the input is untouched
    assert fill_pixels(image, "background").shape == image.shape


def test_an_edit_round_trips_through_json_and_names_itself() -> None:
    edit = Edit(box=(0, 1, 5, 6), strokes=(((1.0, 2.0), (3.0, 4.0)),), brush_width=4, fill="blur", question="why?")
    assert Edit.from_json(edit.to_json()) == edit
    assert edit.describe() == "box x 0-5, y 1-6; 1 brush stroke filled with blur; question 'why?'"
    with pytest.raises(VLIError, match="not a counterfactual edit"):
        Edit.from_json("{broken")


@pytest.mark.parametrize(
    ("edit", "message"),
    [(Edit(), "changes nothing"), (Edit(box=(0, 0, 1, 1), fill="paint"), "unknown fill")],  # type: ignore[arg-type]
)
def test_an_edit_that_changes_nothing_or_fills_with_paint_is_refused(edit: Edit, message: str) -> None:
    with pytest.raises(VLIError, match=message):
        edit.check()


@pytest.fixture(scope="module")
def vqa_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("vqa") / "store"
    extract("single_stream", scene_sources(2), store, progress=False, relevancy=["rollout"])
    return store


def test_a_vqa_counterfactual_is_stored_linked_and_compared(vqa_store: Path) -> None:
    live = LiveModel("single_stream")
    before = open_dataset(vqa_store)
    original = str(before.indexes["example"][0])
    assert (origins(before) == "").all()  # a store written before counterfactuals: every example an original
    edit = Edit(box=(0, 0, 64, 64), fill="mean", question="what color is the circle?")
    added = live.add_counterfactual(vqa_store, original, edit)
    ds = open_dataset(vqa_store)
    assert ds.vli.origin(added.example_id) == original
    assert ds.vli.origin(original) is None
    assert ds.vli.counterfactuals(original) == [added.example_id]
    assert ds.vli.edit(added.example_id) == edit
    assert str(ds["text"].sel(example=added.example_id).values) == "what color is the circle?"
    stored = ds.vli.tokens(added.example_id).image
    np.testing.assert_array_equal(stored, edit.apply(ds.vli.tokens(original).image))
    table = compare(ds, original, added.example_id)
    assert list(table.columns) == [
        "step", "token_original", "probability_original", "token_edited", "probability_edited", "change"
    ]  # fmt: skip
    assert table["token_edited"].iloc[0] == str(ds["prediction"].sel(example=added.example_id).values)
    assert image_map(ds, added.example_id, "rollout").shape == stored.shape[:2]
    assert json.loads(str(ds["counterfactual_edit"].sel(example=original).values or "{}")) == {}


def test_a_dual_encoder_counterfactual_compares_scores(tmp_path: Path) -> None:
    store = tmp_path / "store"
    extract("dual_encoder", scene_sources(1, text="caption"), store, progress=False)
    ds = open_dataset(store)
    original = str(ds.indexes["example"][0])
    added = LiveModel("dual_encoder").add_counterfactual(store, original, Edit(box=(0, 0, 32, 64), fill="background"))
    table = compare(open_dataset(store), original, added.example_id)
    assert table["probability_original"].iloc[0] != table["probability_edited"].iloc[0]  # the similarity moved


def test_a_generative_counterfactual_regenerates_its_answer(tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(REPO / "datasets" / "generative", store, ignore=shutil.ignore_patterns(".index"))
    live = LiveModel("generative")
    ds = open_dataset(store)
    original = "scene-1000000000"  # "describe the scene": a yellow triangle at the top left, ...
    added = live.add_counterfactual(store, original, Edit(box=(0, 0, 33, 33), fill="background"))
    ds = open_dataset(store)
    table = compare(ds, original, added.example_id)
    assert table["token_original"].iloc[1] == "yellow"
    assert table["token_edited"].iloc[1] == "blue"  # the yellow triangle is gone: the description starts elsewhere
    assert ds.vli.answer(added.example_id)["token"].iloc[-1] == "[EOS]"
    # the stored maps of the edit exist for every method of the store
    for method in ds.vli.answer_methods:
        assert np.isfinite(image_map(ds, added.example_id, method, step=1)).all()
