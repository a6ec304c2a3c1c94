"""LRP through the built-in models' layers: the rules on hand-checked numbers, conservation, Transformer Attribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlinterpret_panel.adapters.base import ModelInput
from vlinterpret_panel.adapters.registry import load_adapter
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.models import world
from vlinterpret_panel.relevancy import Captured, transformer_attribution
from vlinterpret_panel.relevancy.lrp import (
    ActivationRecorder,
    add_relevance,
    attention_relevance,
    captured_with_lrp,
    linear_relevance,
    matmul_relevance,
    propagate,
)

SELF_ATTENTION_MODELS = ("single_stream", "dual_encoder")


def _item(architecture: str, seed: int = 3) -> ModelInput:
    scene, question = world.vqa_example_for_seed(world.HELDOUT_SEED_START + seed)
    text = world.make_caption(scene) if architecture == "dual_encoder" else question.question
    return ModelInput(f"seed{seed}", scene.image, text, question.answer, question.target_mask)


@pytest.fixture(scope="module")
def adapters() -> dict:
    return {name: load_adapter(name) for name in (*SELF_ATTENTION_MODELS, "dual_stream")}


def test_linear_rule_by_hand() -> None:
    # x = [1, -2]; output 0: contributions 1*1 = 1 and -2*1 = -2 -> only input 0 is positive, it takes all of R_0 = 1.
    # output 1: contributions 1*2 = 2 and -2*-1 = 2 -> both positive, R_1 = 2 split 2/4 and 2/4 -> [1, 1].
    inputs = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    weight = torch.tensor([[1.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    relevance = linear_relevance(inputs, weight, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    np.testing.assert_allclose(relevance.numpy(), [[2.0, 1.0]], rtol=1e-8)


def test_linear_rule_gives_nothing_without_positive_contributions() -> None:
    # Every contribution is negative: the denominator is 0, so the relevance is dropped (0), not NaN.
    relevance = linear_relevance(torch.tensor([[1.0]]), torch.tensor([[-1.0]]), torch.tensor([[1.0]]))
    assert relevance.item() == 0.0


def test_skip_connection_splits_then_renormalises() -> None:
    # first + second = 1 - 3 = -2; x * R / (x1 + x2) gives -1 and 3; shares by |sum|: 1/4 and 3/4 of R = 2.
    first, second = torch.tensor([1.0], dtype=torch.float64), torch.tensor([-3.0], dtype=torch.float64)
    relevance_first, relevance_second = add_relevance(first, second, torch.tensor([2.0], dtype=torch.float64))
    np.testing.assert_allclose([relevance_first.item(), relevance_second.item()], [0.5, 1.5], rtol=1e-8)


def test_matmul_gives_each_operand_half() -> None:
    generator = torch.Generator().manual_seed(0)
    left = torch.rand(3, 4, generator=generator, dtype=torch.float64)
    right = torch.rand(4, 2, generator=generator, dtype=torch.float64)
    relevance = torch.rand(3, 2, generator=generator, dtype=torch.float64)
    relevance_left, relevance_right = matmul_relevance(left, right, relevance)
    # Gradient x input of a bilinear product: each operand recovers the whole of R, halved.
    assert relevance_left.sum().item() == pytest.approx(relevance.sum().item() / 2, rel=1e-8)
    assert relevance_right.sum().item() == pytest.approx(relevance.sum().item() / 2, rel=1e-8)
    np.testing.assert_allclose(
        relevance_left[0, 0].item(), left[0, 0] * (right[0] * relevance[0] / (left @ right)[0]).sum() / 2
    )


@pytest.mark.parametrize("architecture", SELF_ATTENTION_MODELS)
def test_relevance_is_conserved_down_to_the_embeddings(adapters: dict, architecture: str) -> None:
    adapter = adapters[architecture]
    for seed in range(3):
        item = _item(architecture, seed)
        frame, input_total = attention_relevance(adapter, item)
        # The explained output starts with relevance 1; float32 activations, float64 propagation.
        assert input_total == pytest.approx(1.0, abs=1e-4)
        assert np.isfinite(frame).all() and (np.abs(frame).sum(axis=(1, 2, 3)) > 0).all()


def test_recorder_removes_its_hooks(adapters: dict) -> None:
    model = adapters["single_stream"].model
    recorder = ActivationRecorder(model)
    recorder.close()
    assert all(not module._forward_hooks for module in model.modules())


def test_propagate_on_the_model_directly_matches_the_adapter_frame(adapters: dict) -> None:
    adapter = adapters["single_stream"]
    item = _item("single_stream")
    frame, _ = attention_relevance(adapter, item)
    ids, mask = world.encode_batch([item.text])
    pixels = torch.from_numpy(item.image[None]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    recorder = ActivationRecorder(adapter.model)
    with torch.no_grad():
        logits = adapter.model(torch.from_numpy(ids), torch.from_numpy(mask), pixels).logits
    recorder.close()
    result = propagate(adapter.model, recorder, int(logits.argmax()))
    n = ids.shape[1] + adapter.model.config.num_patches
    assert frame.shape == (len(result.attention), adapter.model.config.num_heads, n, n)
    np.testing.assert_allclose(frame[-1], result.attention[-1][0].numpy(), rtol=1e-5, atol=1e-9)
    # The [CLS] row of the last block carries all of the attention branch's relevance there.
    assert np.abs(frame[-1][:, 1:].sum()) < 1e-6 * np.abs(frame[-1]).sum()


@pytest.mark.parametrize("architecture", SELF_ATTENTION_MODELS)
def test_transformer_attribution_runs_on_the_self_attention_models(adapters: dict, architecture: str) -> None:
    captured = captured_with_lrp(adapters[architecture], _item(architecture))
    assert isinstance(captured, Captured)
    relevancy = transformer_attribution(captured)
    real = relevancy.values[np.isfinite(relevancy.values)]
    assert real.shape == relevancy.values.shape
    assert (real >= 0).all() and real.sum() > 0
    assert relevancy.image.max() > 0


def test_dual_stream_is_refused(adapters: dict) -> None:
    with pytest.raises(VLIError, match="single_stream or dual_encoder"):
        attention_relevance(adapters["dual_stream"], _item("dual_stream"))
    with pytest.raises(VLIError, match="co-attention"):
        propagate(adapters["dual_stream"].model, ActivationRecorder(torch.nn.Linear(1, 1)))
