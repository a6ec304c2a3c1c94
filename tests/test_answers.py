"""``ds.vli`` reads of generated answers equal plain xarray selections of the stored variables, on subsets too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlinterpret_panel import open_dataset
from vlinterpret_panel.adapters.generative import GenerationOptions
from vlinterpret_panel.answers import ATTENTION
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.extract import extract, scene_sources


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three held-out descriptions by the built-in generative model, two methods, answer rows only."""
    path = tmp_path_factory.mktemp("answers") / "store"
    options = GenerationOptions(methods=["raw_attention", "rollout"], top_k=3)
    report = extract("generative", scene_sources(3, text="describe"), path, generation=options, progress=False)
    assert report.written == 3
    return path


def test_answer_table_lists_the_generated_steps_only(store: Path) -> None:
    ds = open_dataset(store)
    for position, example in enumerate(ds.example.values):
        table = ds.vli.answer(str(example))
        stored = ds.isel(example=position)
        generated = stored.answer_position.values >= 0
        assert list(table["token"]) == [str(t) for t in stored.answer_token.values[generated]]
        assert np.array_equal(table["position"], stored.answer_position.values[generated])
        np.testing.assert_allclose(table["probability"], stored.answer_probability.values[generated])
        assert table["token"].iloc[-1] == "[EOS]"


def test_alternatives_are_the_stored_top_k_and_greedy_picks_the_first(store: Path) -> None:
    ds = open_dataset(store)
    example = str(ds.example.values[0])
    answer = ds.vli.answer(example)
    for step in range(len(answer)):
        alternatives = ds.vli.alternatives(example, step)
        assert list(alternatives["rank"]) == [1, 2, 3]
        assert np.all(np.diff(alternatives["probability"]) <= 0)
        assert alternatives["token"].iloc[0] == answer["token"].iloc[step]  # greedy decoding
        assert alternatives["probability"].iloc[0] == pytest.approx(answer["probability"].iloc[step], rel=1e-3)


def test_token_k_map_is_the_plain_xarray_selection(store: Path) -> None:
    ds = open_dataset(store)
    example = str(ds.example.values[1])
    n_tokens = int(ds.seq_len.sel(example=example))
    step = 2
    one = ds.sel(example=example)
    for method in ("raw_attention", "rollout"):
        expected = one.answer_relevancy.sel(step=step, relevancy_method=method).values[:n_tokens]
        np.testing.assert_allclose(ds.vli.answer_map(example, step, method), np.nan_to_num(expected))
    rows = one.answer_attention.isel(step=step, layer=-1)
    np.testing.assert_allclose(ds.vli.answer_map(example, step, ATTENTION, -1, 1), rows.isel(head=1).values[:n_tokens])
    np.testing.assert_allclose(
        ds.vli.answer_map(example, step, ATTENTION, -1, None), rows.mean("head").values[:n_tokens], rtol=1e-6
    )
    query = int(one.answer_position.sel(step=step)) - 1
    assert not ds.vli.answer_map(example, step, ATTENTION)[query + 1 :].any()  # causal: nothing after the query


def test_subsets_read_their_own_examples_in_any_order(store: Path) -> None:
    ds = open_dataset(store)
    full = [ds.vli.answer(i) for i in range(3)]
    subset = ds.isel(example=[2, 0])
    assert subset.vli.answer(0).equals(full[2]) and subset.vli.answer(1).equals(full[0])
    np.testing.assert_array_equal(subset.vli.answer_map(0, 1, "rollout"), ds.vli.answer_map(2, 1, "rollout"))


def test_a_store_without_answers_says_so(tmp_path: Path) -> None:
    from vlinterpret_panel.synth import SynthSpec, write_synthetic_store

    path = tmp_path / "synthetic"
    write_synthetic_store(path, SynthSpec(examples=2, layers=1, heads=1, tokens=8))
    ds = open_dataset(path)
    assert not ds.vli.has_answers
    with pytest.raises(VLIError, match="--generate"):
        ds.vli.answer(0)
    assert ds.vli.answer_methods == []


def test_reliance_shares_by_hand() -> None:
    from vlinterpret_panel.answers import reliance

    modality = np.array(["special", "image", "image", "text", "text", "text"])
    maps = np.array(
        [
            [0.1, 0.3, 0.2, 0.4, 0.0, 0.0],  # the first generated token (position 4) reads up to position 3
            [0.0, 0.0, 0.0, 0.5, 0.5, -1.0],  # negative relevancy counts as 0
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # nothing positive: NaN
        ]
    )
    shares = reliance(maps, modality, answer_start=4)
    np.testing.assert_allclose(shares.loc[0], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(shares.loc[1], [0.0, 0.5, 0.5])
    assert shares.loc[2].isna().all()


def test_reliance_of_a_stored_answer_sums_to_one(store: Path) -> None:
    ds = open_dataset(store)
    shares = ds.vli.reliance(0, "rollout")
    assert len(shares) == len(ds.vli.answer(0))
    np.testing.assert_allclose(shares.sum(axis=1), 1.0, rtol=1e-9)
    assert (shares["answer"].iloc[0] == 0) and (shares["answer"].iloc[-1] > 0)  # nothing generated before token 0


@pytest.mark.parametrize("method", ["rollout", "attention"])
def test_dataset_reliance_equals_the_per_example_reliance(store: Path, method: str) -> None:
    ds = open_dataset(store)
    shares = ds.vli.dataset_reliance(method)
    assert shares.dims == ("example", "step", "part")
    for position in range(ds.sizes["example"]):
        one = ds.vli.reliance(position, method)
        np.testing.assert_allclose(shares.isel(example=position).values[: len(one)], one.values, rtol=1e-6)
        assert shares.isel(example=position).isnull().values[len(one) :].all()
    subset = ds.isel(example=[2, 1])
    np.testing.assert_allclose(subset.vli.dataset_reliance(method).isel(example=0), shares.isel(example=2))
