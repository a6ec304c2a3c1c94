"""The evaluation end to end on each built-in model, small enough for CI, and its batched scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlinterpret_panel.adapters.builtin import BuiltinAdapter
from vlinterpret_panel.adapters.registry import load_adapter
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.extract import scene_sources
from vlinterpret_panel.relevancy.evaluate import (
    FRACTIONS,
    MODALITIES,
    TESTS,
    evaluate,
    keep_mask,
    result_rows,
    supported_methods,
    world_examples,
)

MODELS = ("single_stream", "dual_stream", "dual_encoder")


@pytest.fixture(scope="module")
def adapters() -> dict[str, BuiltinAdapter]:
    return {name: load_adapter(name) for name in MODELS}


@pytest.mark.parametrize("name", MODELS)
def test_evaluation_runs_end_to_end_and_its_table_is_complete(adapters: dict, name: str) -> None:
    adapter = adapters[name]
    methods, _ = supported_methods(adapter)
    examples = world_examples(16, captions=name == "dual_encoder")[:3]
    result = evaluate(adapter, examples, methods)
    rows = result_rows(result)
    assert [row["method"] for row in rows] == methods
    for row in rows:
        aucs = [row[f"{part}_{test}_auc"] for part in MODALITIES for test in TESTS]
        assert all(0.0 <= auc <= 90.0 for auc in aucs), row
        assert 0.0 <= row["pointing_game"] <= 1.0 and 0.0 <= row["mask_iou"] <= 1.0
    # Nothing is deleted at fraction 0: every method and test starts from the same clean accuracy.
    starts = {float(curve[0]) for curve in result.accuracy.values()}
    assert len(starts) == 1
    assert len(next(iter(result.accuracy.values()))) == len(FRACTIONS)


@pytest.mark.parametrize("name", MODELS)
def test_batched_scoring_gives_the_same_accuracies_as_one_pass_per_deletion(adapters: dict, name: str) -> None:
    adapter = adapters[name]
    examples = world_examples(16, captions=name == "dual_encoder")[:1]
    methods = ["raw_attention"]
    batched = evaluate(adapter, examples, methods)
    adapter.batch_keep_rows = False  # the instance falls back to adapter.forward per deletion
    try:
        single = evaluate(adapter, examples, methods)
    finally:
        del adapter.batch_keep_rows
    for key, curve in batched.accuracy.items():
        np.testing.assert_array_equal(curve, single.accuracy[key], err_msg=str(key))


@pytest.mark.parametrize("name", MODELS)
def test_keep_rows_of_one_batch_match_separate_passes(adapters: dict, name: str) -> None:
    adapter = adapters[name]
    item = scene_sources(1, text="caption" if name == "dual_encoder" else "question")[0].load()
    with torch.no_grad():
        clean = adapter.forward(item.image, item.text)
    modality = np.asarray(clean.modality)
    rng = np.random.default_rng(0)
    keeps = [
        keep_mask(rng.random(len(modality)), modality, part, fraction, "positive")
        for part in MODALITIES
        for fraction in (0.0, 0.3, 0.6)
    ]
    with torch.no_grad():
        together = adapter.outputs([item.image] * len(keeps), [item.text] * len(keeps), keeps)
        captures = adapter.run_examples([item.image] * len(keeps), [item.text] * len(keeps), keeps)
        apart = [adapter.forward(item.image, item.text, keep_tokens=keep).output for keep in keeps]
    for one, capture, alone in zip(together, captures, apart, strict=True):
        torch.testing.assert_close(one, alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(capture.output, alone, atol=1e-5, rtol=1e-5)


def test_keep_rows_must_match_the_pairs(adapters: dict) -> None:
    adapter = adapters["single_stream"]
    item = scene_sources(1)[0].load()
    keep = np.ones(len(adapter.forward(item.image, item.text).tokens), bool)
    with pytest.raises(VLIError, match="one per pair"):
        adapter.outputs([item.image] * 2, [item.text] * 2, [keep])
