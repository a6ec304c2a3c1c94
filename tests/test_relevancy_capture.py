"""Methods declare what they need; ``capture_for`` runs exactly that; the adapter's two steps equal ``run``."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vlinterpret_panel.adapters.registry import load_adapter
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.extract import scene_sources
from vlinterpret_panel.models import world
from vlinterpret_panel.relevancy import available_methods, compute_relevancy
from vlinterpret_panel.relevancy.capture import capture_for, check_supported, relevancy_values
from vlinterpret_panel.relevancy.registry import ATTENTION, ATTNLRP, GRADIENTS, LRP, method_entry, needs, register

SEED = world.HELDOUT_SEED_START + 7


@pytest.fixture(scope="module")
def adapter():
    return load_adapter("single_stream")


def test_every_method_declares_what_it_needs() -> None:
    declared = {name: method_entry(name).needs for name in available_methods()}
    assert declared == {
        "random": frozenset(),
        "raw_attention": {ATTENTION},
        "rollout": {ATTENTION},
        "attention_gradcam": {ATTENTION, GRADIENTS},
        "generic": {ATTENTION, GRADIENTS},
        "transformer_attribution": {ATTENTION, GRADIENTS, LRP},
        "attnlrp": {ATTNLRP},
    }
    assert needs(["rollout", "random"]) == {ATTENTION}
    with pytest.raises(ValueError, match="unknown needs"):
        register("bad", needs=["telepathy"])


@pytest.mark.parametrize(
    ("methods", "gradients", "lrp", "attnlrp"),
    [
        (["raw_attention", "rollout"], False, False, False),
        (["generic"], True, False, False),
        (["transformer_attribution"], True, True, False),
        (["attnlrp", "rollout"], False, False, True),
    ],
)
def test_capture_for_runs_what_the_methods_need(
    adapter, methods: list[str], gradients: bool, lrp: bool, attnlrp: bool
) -> None:
    item = scene_sources(1, seed=SEED)[0].load()
    captured, record, _ = capture_for(adapter, item, methods)
    assert (captured.attention_gradient is not None) == gradients
    assert (captured.attention_relevance is not None) == lrp
    assert (captured.token_relevance is not None) == attnlrp
    values = relevancy_values(captured, methods)
    assert set(values) == set(methods) and all(np.isfinite(v[: captured.n_tokens]).all() for v in values.values())
    assert record.example_id == item.example_id


def test_random_is_a_registered_seeded_method(adapter) -> None:
    captured, _, _ = capture_for(adapter, scene_sources(1, seed=SEED)[0].load(), ["random"])
    values = compute_relevancy(captured, "random", seed=4).values
    np.testing.assert_array_equal(values[: captured.n_tokens], np.random.default_rng(4).random(captured.n_tokens))
    assert np.isnan(values[captured.n_tokens :]).all()


def test_lrp_methods_are_refused_for_models_without_lrp_rules() -> None:
    with pytest.raises(VLIError, match="built-in models only"):
        check_supported(SimpleNamespace(name="hf_vilt", model=None), ["generic", "transformer_attribution"])
    assert check_supported(SimpleNamespace(name="hf_vilt", model=None), [" generic "]) == ["generic"]


def test_run_is_run_model_then_to_record(adapter) -> None:
    item = scene_sources(1, seed=SEED + 1)[0].load()
    record, info = adapter.run(item, gradients=True)
    model_run = adapter.run_model(item, gradients=True)
    again, again_info = adapter.to_record(item, model_run)
    np.testing.assert_array_equal(record.attention, again.attention)
    np.testing.assert_array_equal(record.attention_gradient, again.attention_gradient)
    assert (record.prediction, record.relevancy_target, info) == (again.prediction, again.relevancy_target, again_info)
    batched = adapter.to_record(item, adapter.explain(adapter.forward_batch([item.image], [item.text])[0]))[0]
    np.testing.assert_allclose(batched.attention, record.attention, atol=1e-6)
    assert batched.attention_gradient is None
