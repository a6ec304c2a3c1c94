"""The example notebooks run in a Jupyter kernel of this environment and compute what independent computations do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlinterpret_panel import open_dataset
from vlinterpret_panel.relevancy.localisation import stored_pointing_game

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need the 'lab' extra (nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need the 'lab' extra (nbclient, ipykernel)")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "docs" / "notebooks"


def run_notebook(name: str) -> dict:
    """Execute ``docs/notebooks/<name>.ipynb`` in its own directory; the JSON its last cell prints."""
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells), f"{name}.ipynb is committed with outputs"
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    printed = [output["text"] for output in notebook.cells[-1]["outputs"] if output.get("name") == "stdout"]
    return json.loads(printed[-1].strip().splitlines()[-1])


def test_explore_finds_the_head_an_independent_numpy_computation_finds() -> None:
    results = run_notebook("explore")
    ds = open_dataset(REPO / "datasets" / "single_stream").compute()
    # text_to_image by hand: per example, layer and head, the mean over text queries of their mass on image keys.
    totals = np.zeros((ds.sizes["layer"], ds.sizes["head"]))
    for position in range(ds.sizes["example"]):
        modality = ds["modality"].values[position].astype(str)
        text, image = np.flatnonzero(modality == "text"), np.flatnonzero(modality == "image")
        attention = ds["attention"].values[position]  # layer, head, query, key
        totals += attention[:, :, text][:, :, :, image].sum(-1).mean(-1)
    by_hand = totals / ds.sizes["example"]
    layer, head = np.unravel_index(by_hand.argmax(), by_hand.shape)
    assert (results["layer"], results["head"]) == (int(layer), int(head))
    assert results["text_to_image"] == pytest.approx(by_hand.max(), abs=1e-5)
    # The head it names as looking at the object does: several times the object's share of the image.
    assert results["share_on_object"] > 4 * results["object_area"]


def test_relevancy_scores_the_pointing_game_as_the_library_does() -> None:
    results = run_notebook("relevancy")
    ds = open_dataset(REPO / "datasets" / "single_stream")
    library = stored_pointing_game(ds, ds.vli.relevancy_methods, max_examples=100)
    assert results["pointing"] == pytest.approx(library, abs=1e-12)
    assert results["examples"] > 50


def test_answer_gives_each_tokens_image_share_as_computed_from_the_stored_maps() -> None:
    results = run_notebook("answer")
    ds = open_dataset(REPO / "datasets" / "generative")
    one = ds.sel(example="scene-1000000000").compute()
    steps = int((one["answer_token"].values.astype(str) != "").sum())
    assert results["tokens"] == [str(t) for t in one["answer_token"].values[:steps]]
    is_image = one["modality"].values.astype(str) == "image"
    for step in range(steps):
        values = np.clip(one["answer_relevancy"].sel(relevancy_method="generic").values[step], 0, None)
        values = np.nan_to_num(values)
        assert results["image_share"][step] == pytest.approx(values[is_image].sum() / values.sum(), abs=1e-6)
