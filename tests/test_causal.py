"""Causal explanations: the search on a hand-made model, cancelling, storage, and reruns of the real models."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from vlinterpret_panel import causal, open_dataset
from vlinterpret_panel.adapters.registry import load_adapter
from vlinterpret_panel.causal import CancelledError, search
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.extract import extract, scene_sources
from vlinterpret_panel.live import LiveModel

REPO = Path(__file__).resolve().parents[1]


class AdditiveProbe:
    """A model by hand: units 1..6 (1-4 patches, 5-6 words); the target's probability is 0.1 + the kept weights.

    Weights 0.5 (unit 2), 0.3 (unit 5), 0.1 (unit 3); the rest 0. The output changes ("other") once
    the kept weight of the patches drops below 0.3, i.e. when unit 2 is deleted.
    """

    units = np.array([1, 2, 3, 4, 5, 6])
    patches = np.array([1, 2, 3, 4])
    target = "yes"

    def __init__(self) -> None:
        self.calls = 0
        self.weights = {2: 0.5, 5: 0.3, 3: 0.1}

    def __call__(self, kept_sets: Sequence[np.ndarray]) -> tuple[np.ndarray, list[str]]:
        self.calls += len(kept_sets)
        probabilities = np.array([0.1 + sum(self.weights.get(int(u), 0) for u in kept) for kept in kept_sets])
        winners = [
            "yes" if sum(self.weights.get(int(u), 0) for u in kept if u in self.patches) >= 0.3 else "other"
            for kept in kept_sets
        ]
        return probabilities, winners


def test_the_search_finds_the_smallest_sets_by_hand() -> None:
    probe = AdditiveProbe()
    # Full input: 0.1 + 0.9 = 1.0; at 0.8 it needs >= 0.8: units 2 and 5 (0.9), not 2 alone (0.6).
    # Relevance misorders units 3 and 5 (3 ranked above 5): growing keeps 2, 3, 5; pruning drops 3.
    relevance = np.array([0.0, 0.9, 0.5, 0.0, 0.4, 0.1])
    kept, kept_probability, necessary, changed_to, full, reruns = search(probe, relevance, threshold=0.8)
    assert full == pytest.approx(1.0)
    assert kept == [2, 5]
    assert kept_probability == pytest.approx(0.9)
    assert necessary == [2] and changed_to == "other"
    assert reruns == probe.calls


def test_a_low_threshold_keeps_less_and_a_threshold_of_one_keeps_what_matters() -> None:
    relevance = np.array([0.0, 0.9, 0.5, 0.0, 0.4, 0.1])
    assert search(AdditiveProbe(), relevance, threshold=0.5)[0] == [2]  # 0.6 >= 0.5
    assert search(AdditiveProbe(), relevance, threshold=1.0)[0] == [2, 3, 5]  # every unit of weight
    with pytest.raises(VLIError, match="share of the probability"):
        search(AdditiveProbe(), relevance, threshold=1.5)


def test_a_cancelled_search_stops_and_says_so() -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        search(AdditiveProbe(), np.ones(6), cancel=cancel)


def test_progress_is_reported_up_to_done() -> None:
    seen: list[tuple[float, str]] = []
    search(AdditiveProbe(), np.ones(6), progress=lambda fraction, message: seen.append((fraction, message)))
    fractions = [fraction for fraction, _ in seen]
    assert fractions == sorted(fractions) and seen[-1] == (1.0, "done")


@pytest.fixture(scope="module")
def generative_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("generative") / "store"
    shutil.copytree(REPO / "datasets" / "generative", store, ignore=shutil.ignore_patterns(".index"))
    return store


def test_a_generated_tokens_kept_set_keeps_its_probability_when_rerun(generative_store: Path) -> None:
    live = LiveModel("generative")
    example = "scene-1000000003"  # "what color is the triangle?" -> "blue"
    found = live.explain_causally(generative_store, example, step=0, threshold=0.9)
    assert found.token == "blue"
    assert (found.example, found.step, found.method) == (example, 0, "generic")
    # Rerun outside the search: a fresh adapter, the kept set alone.
    ds = open_dataset(generative_store)
    tokens = ds.vli.tokens(example)
    answer = ds.vli.answer(example)
    adapter = load_adapter("generative")
    position = int(answer["position"].iloc[0])

    def rerun(kept: np.ndarray) -> tuple[float, str]:
        (probability,), (winner,) = adapter.kept_outputs(
            tokens.image, list(tokens.token_text), position, np.array(found.units), [kept], "blue"
        )
        return float(probability), winner

    full, _ = rerun(np.array(found.units))
    kept, _ = rerun(np.array(found.kept))
    assert full == pytest.approx(float(answer["probability"].iloc[0]), abs=1e-4)  # the rerun is the stored model
    assert kept == pytest.approx(found.kept_probability, abs=1e-6)
    assert kept >= 0.9 * full
    assert len(found.kept) < len(found.units)
    # Necessity: deleting the necessary patches changes the token, as stated.
    _, changed = rerun(np.array([u for u in found.units if u not in found.necessary]))
    assert found.necessary and changed == found.changed_to != "blue"
    # Stored beside the shards, read back through the accessor; the store still opens.
    assert open_dataset(generative_store).vli.causal_explanations(example) == [found]


def test_a_later_token_is_explained_with_the_answer_so_far(generative_store: Path) -> None:
    found = LiveModel("generative").explain_causally(generative_store, "scene-1000000007", step=1)  # "top right"
    assert found.token == "right"
    assert found.kept_probability >= 0.9 * found.probability
    positions = open_dataset(generative_store).vli.answer("scene-1000000007")["position"]
    assert max(found.units) < int(positions.iloc[0])  # answer tokens are never deleted


def test_a_vqa_answer_is_explained(tmp_path: Path) -> None:
    store = tmp_path / "store"
    extract("single_stream", scene_sources(1), store, progress=False, relevancy=["generic"])
    example = str(open_dataset(store).indexes["example"][0])
    found = LiveModel("single_stream").explain_causally(store, example, threshold=0.9)
    assert found.token == str(open_dataset(store)["prediction"].values[0])
    assert found.kept_probability >= 0.9 * found.probability
    assert found.method == "generic"


def test_saving_replaces_the_same_explanation_and_a_damaged_file_is_named(generative_store: Path) -> None:
    live = LiveModel("generative")
    first = live.explain_causally(generative_store, "scene-1000000001", threshold=0.8)
    live.explain_causally(generative_store, "scene-1000000001", threshold=0.8)
    live.explain_causally(generative_store, "scene-1000000001", threshold=0.5)
    stored = causal.load(generative_store, "scene-1000000001")
    assert [e.threshold for e in stored] == [0.8, 0.5]
    assert stored[0].kept == first.kept
    path = causal.explanation_path(generative_store, "scene-1000000001")
    path.write_text("[{")
    with pytest.raises(VLIError, match="not a file of causal explanations"):
        causal.load(generative_store, "scene-1000000001")
    path.unlink()


def test_models_that_cannot_rerun_are_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    extract("dual_encoder", scene_sources(1, text="caption"), store, progress=False)
    example = str(open_dataset(store).indexes["example"][0])
    with pytest.raises(VLIError, match="need a VQA or generative model"):
        LiveModel("dual_encoder").explain_causally(store, example)
