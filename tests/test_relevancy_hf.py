"""The relevancy methods are model-agnostic: the same code explains tiny random Hugging Face models."""

from __future__ import annotations

import numpy as np
import pytest

from tests.hf_tiny import scene
from tests.test_adapters_hf import _build
from vlinterpret_panel.adapters import ModelAdapter, ModelInput
from vlinterpret_panel.relevancy import Captured, compute_relevancy
from vlinterpret_panel.schema import IMAGE, TEXT

FAMILIES = ("vilt", "clip", "lxmert", "llava")
METHODS = ("raw_attention", "rollout", "attention_gradcam", "generic")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelAdapter]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: _build(family, root / family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_explains_every_family(adapters: dict[str, ModelAdapter], family: str) -> None:
    record, info = adapters[family].run(ModelInput("r", scene(64, 96, 1), "what color is the square ?"), gradients=True)
    captured = Captured.from_record(record, info)
    modality = np.asarray(record.modality)
    for method in METHODS:
        result = compute_relevancy(captured, method)
        values = np.asarray(result.values)
        assert values.shape == (len(record.tokens),), (family, method)
        real = values[modality != "pad"]
        assert np.isfinite(real[(modality == TEXT) | (modality == IMAGE)]).all(), (family, method)
        if method == "generic":
            # it must see the gradients: some token gets relevancy (Grad-CAM may clamp all to 0)
            assert np.abs(np.nan_to_num(values)).sum() > 0, (family, method)
        assert len(result.image) > 0, (family, method)
