"""Relevancy stored at extraction (``extract(..., relevancy=...)``, ``vlinterpret extract --relevancy``).

Stored values equal a direct ``compute_relevancy`` on the adapter's own gradient run, for
each built-in model (VQA answers and the dual encoder's similarity); attention-only methods
run batched and agree too; unknown methods are a user error before anything runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlinterpret_panel.adapters.builtin import BuiltinAdapter
from vlinterpret_panel.adapters.registry import load_adapter
from vlinterpret_panel.cli import main
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.extract import extract, scene_sources
from vlinterpret_panel.models import world
from vlinterpret_panel.relevancy import Captured, compute_relevancy
from vlinterpret_panel.relevancy.capture import capture_for
from vlinterpret_panel.relevancy.registry import ATTENTION, GRADIENTS, needs
from vlinterpret_panel.store import open_dataset

METHODS = ["generic", "rollout", "raw_attention", "attention_gradcam"]
SEED = world.HELDOUT_SEED_START + 100


@pytest.mark.parametrize("name", ["single_stream", "dual_stream", "dual_encoder"])
def test_stored_relevancy_equals_a_direct_computation(name: str, tmp_path: Path) -> None:
    adapter: BuiltinAdapter = load_adapter(name)
    text = "caption" if name == "dual_encoder" else "question"
    sources = scene_sources(3, seed=SEED, text=text)
    report = extract(adapter, sources, tmp_path / "store", relevancy=METHODS, batch_size=3, progress=False)
    assert report.written == 3 and not report.failures
    ds = open_dataset(tmp_path / "store")
    assert sorted(ds.relevancy_method.values.tolist()) == sorted(METHODS)
    record, info = adapter.run(sources[1].load(), gradients=True)
    captured = Captured.from_record(record, info)
    stored = ds.sel(example=sources[1].example_id)
    for method in METHODS:
        direct = compute_relevancy(captured, method).values
        values = stored.relevancy.sel({"relevancy_method": method}).values[: len(direct)]
        np.testing.assert_allclose(values, direct, rtol=1e-6, atol=1e-9)
        assert np.abs(direct).sum() > 0
        assert str(stored.relevancy_target.sel({"relevancy_method": method}).values) == (
            "score" if name == "dual_encoder" else record.prediction
        )
    assert np.isnan(stored.relevancy.values[:, int(stored.seq_len) :]).all()


def test_attention_only_methods_run_batched_and_agree(tmp_path: Path) -> None:
    """rollout and raw_attention need no gradients: extracted through forward_batch, same values as one run."""
    adapter: BuiltinAdapter = load_adapter("single_stream")
    methods = ["rollout", "raw_attention"]
    assert needs(methods) == {ATTENTION} and GRADIENTS in needs(["rollout", "generic"])
    sources = scene_sources(4, seed=SEED)
    extract(adapter, sources, tmp_path / "store", relevancy=methods, batch_size=4, progress=False)
    ds = open_dataset(tmp_path / "store")
    record, info = adapter.run(sources[2].load())
    captured = Captured.from_record(record, info)
    stored = ds.sel(example=sources[2].example_id)
    for method in methods:
        direct = compute_relevancy(captured, method).values
        np.testing.assert_allclose(
            stored.relevancy.sel({"relevancy_method": method}).values[: len(direct)], direct, atol=1e-6
        )


def test_cli_relevancy_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    args = ["extract", "dual_stream", str(store), "--scenes", "2", "--seed", str(SEED), "--quiet"]
    assert main([*args, "--relevancy", "generic,rollout"]) == 0
    ds = open_dataset(store)
    assert sorted(ds.relevancy_method.values.tolist()) == ["generic", "rollout"]
    assert (ds.relevancy_target.values == ds.prediction.values[:, None]).all()
    assert '"relevancy": ["generic", "rollout"]' in ds.attrs["extraction"]
    capsys.readouterr()
    assert main([*args, "--relevancy", "generic,nonsense"]) == 2
    assert "unknown relevancy method 'nonsense'" in capsys.readouterr().err


def test_unknown_method_fails_before_running(tmp_path: Path) -> None:
    with pytest.raises(VLIError, match="unknown relevancy method"):
        extract("single_stream", scene_sources(1), tmp_path / "store", relevancy=["lrp"], progress=False)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("name", ["single_stream", "dual_stream", "dual_encoder"])
def test_lrp_methods_are_stored_with_their_lrp_passes(name: str, tmp_path: Path) -> None:
    adapter: BuiltinAdapter = load_adapter(name)
    methods = ["transformer_attribution", "attnlrp"]
    sources = scene_sources(2, seed=SEED, text="caption" if name == "dual_encoder" else "question")
    report = extract(adapter, sources, tmp_path / "store", relevancy=methods, progress=False)
    assert report.written == 2 and not report.failures
    captured, _, _ = capture_for(adapter, sources[0].load(), methods)
    stored = open_dataset(tmp_path / "store").sel(example=sources[0].example_id)
    for method in methods:
        direct = compute_relevancy(captured, method).values
        values = stored.relevancy.sel({"relevancy_method": method}).values[: len(direct)]
        np.testing.assert_allclose(values, direct, rtol=1e-6, atol=1e-9 * np.abs(direct).max())
        assert np.abs(direct).sum() > 0


def test_lrp_methods_are_refused_before_running_for_models_without_lrp(tmp_path: Path) -> None:
    from tests.hf_tiny import tiny_vilt
    from vlinterpret_panel.adapters.hf_vilt import ViltAdapter

    model, processor = tiny_vilt(tmp_path / "vilt")
    adapter = ViltAdapter(model, processor, name="tiny-vilt")
    for method in ("transformer_attribution", "attnlrp"):
        with pytest.raises(VLIError, match=f"{method} needs LRP .* built-in models only, not 'tiny-vilt'"):
            extract(adapter, scene_sources(1), tmp_path / "store", relevancy=[method], progress=False)
        assert not (tmp_path / "store").exists()
