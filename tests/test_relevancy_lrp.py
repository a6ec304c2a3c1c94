"""LRP through the built-in models' layers: the rules on hand-checked numbers, conservation, Transformer Attribution."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.builtin_models import BUILTIN_MODELS, heldout_item
from vlinterpret_panel.adapters.base import ModelInput
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.models import world
from vlinterpret_panel.relevancy import Captured, transformer_attribution
from vlinterpret_panel.relevancy.capture import capture_for
from vlinterpret_panel.relevancy.lrp import (
    ActivationRecorder,
    add_relevance,
    attention_relevance,
    linear_relevance,
    matmul_relevance,
    propagate,
)


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


def _unused_maps(adapter, item: ModelInput) -> list[int]:
    """Maps nothing read at the answer depends on: the last co-attention layer's image-query maps."""
    cross_layers = getattr(adapter.model, "cross_layers", [])
    if not cross_layers:
        return []
    last = f"cross_layers.{len(cross_layers) - 1}."
    names = [module.name for module in adapter.forward(item.image, item.text).attentions]
    return [index for index, name in enumerate(names) if name in (last + "image_cross", last + "image_self")]


@pytest.mark.parametrize("architecture", BUILTIN_MODELS)
def test_relevance_is_conserved_down_to_the_embeddings(builtin_adapters: dict, architecture: str) -> None:
    adapter = builtin_adapters[architecture]
    # The dual-stream answer is read at text [CLS]: the last layer's image->text cross-attention and
    # image self-attention feed nothing that reaches it, so they must get no relevance at all.
    unused = _unused_maps(adapter, heldout_item(architecture))
    assert len(unused) == (2 if architecture == "dual_stream" else 0)
    for seed in range(3):
        item = heldout_item(architecture, seed)
        frame, input_total = attention_relevance(adapter, item)
        # The explained output starts with relevance 1; float32 activations, float64 propagation.
        assert input_total == pytest.approx(1.0, abs=1e-4)
        per_map = np.abs(frame).sum(axis=(1, 2, 3))
        assert np.isfinite(frame).all()
        assert (per_map[unused] == 0).all() and (np.delete(per_map, unused) > 0).all(), per_map


def test_dual_stream_relevance_reaches_both_streams_and_sits_in_each_maps_block(builtin_adapters: dict) -> None:
    adapter = builtin_adapters["dual_stream"]
    item = heldout_item("dual_stream")
    frame, _ = attention_relevance(adapter, item)
    modules = adapter.forward(item.image, item.text).attentions
    assert frame.shape[0] == len(modules)
    for layer, module in enumerate(modules):
        inside = np.zeros(frame.shape[2:], dtype=bool)
        inside[np.ix_(module.query_tokens, module.key_tokens)] = True
        # R^A of a text->image map lives on text rows x image columns, and so on.
        assert (frame[layer][:, ~inside] == 0).all(), module.name
    recorder = ActivationRecorder(adapter.model)
    with torch.no_grad():
        adapter.forward(item.image, item.text)
    recorder.close()
    result = propagate(adapter.model, recorder, 0)
    # Both streams' embeddings get relevance, and it comes from the explained logit alone.
    assert set(result.inputs) == {"text", "image"}
    assert all(np.abs(part.numpy()).sum() > 0 for part in result.inputs.values())
    assert result.input_total == pytest.approx(1.0, abs=1e-4)


def test_recorder_removes_its_hooks(builtin_adapters: dict) -> None:
    model = builtin_adapters["single_stream"].model
    recorder = ActivationRecorder(model)
    recorder.close()
    assert all(not module._forward_hooks for module in model.modules())


def test_propagate_on_the_model_directly_matches_the_adapter_frame(builtin_adapters: dict) -> None:
    adapter = builtin_adapters["single_stream"]
    item = heldout_item("single_stream")
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


@pytest.mark.parametrize("architecture", BUILTIN_MODELS)
def test_transformer_attribution_runs_on_every_built_in_model(builtin_adapters: dict, architecture: str) -> None:
    captured, _, _ = capture_for(
        builtin_adapters[architecture], heldout_item(architecture), ["transformer_attribution"]
    )
    assert isinstance(captured, Captured)
    relevancy = transformer_attribution(captured)
    real = relevancy.values[np.isfinite(relevancy.values)]
    assert real.shape == relevancy.values.shape
    assert (real >= 0).all() and real.sum() > 0
    assert relevancy.image.max() > 0


def test_models_without_lrp_rules_get_a_clear_error() -> None:
    not_built_in = SimpleNamespace(name="hf_vilt", model=None)
    with pytest.raises(VLIError, match="LRP needs a built-in model"):
        attention_relevance(not_built_in, heldout_item("single_stream"))  # type: ignore[arg-type]
    with pytest.raises(VLIError, match="LRP is implemented for the built-in models"):
        propagate(torch.nn.Linear(1, 1), ActivationRecorder(torch.nn.Linear(1, 1)))


def test_transformer_attribution_without_lrp_relevance_says_how_to_get_it(builtin_adapters: dict) -> None:
    adapter = builtin_adapters["dual_stream"]
    record, info = adapter.run(heldout_item("dual_stream"), gradients=True)
    with pytest.raises(VLIError, match="capture_for"):
        transformer_attribution(Captured.from_record(record, info))


def test_cross_attention_block_rule_by_hand() -> None:
    """One head, one query, two context tokens, identity projections: the numbers worked out below.

    x = [1, 0], context = [[1, 0], [0, 1]], LayerNorms replaced by identity. Scores q·k = [1, 0],
    A = softmax([1, 0]/sqrt(2)); out = A·V = [A0, A1]; block output y = x + out.
    """
    from vlinterpret_panel.models.layers import CrossAttentionBlock
    from vlinterpret_panel.relevancy.lrp import cross_block_relevance

    block = CrossAttentionBlock(2, 1).double()
    with torch.no_grad():
        for norm in (block.norm_query, block.norm_context):
            norm.forward = lambda x: x  # type: ignore[method-assign]
        for linear in (block.attention.query, block.attention.key, block.attention.value, block.attention.output):
            linear.weight.copy_(torch.eye(2, dtype=torch.float64))
            linear.bias.zero_()
    x = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    context = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    recorder = ActivationRecorder(block)
    with torch.no_grad():
        output, probs = block(x, context)
    recorder.close()
    a0, a1 = probs[0, 0, 0].tolist()
    relevance_out = torch.tensor([[[1.0, 1.0]]], dtype=torch.float64)  # R = 1 on each output feature: y = [1 + a0, a1]
    relevance_x, relevance_context, relevance_attention = cross_block_relevance(block, recorder, relevance_out)
    # Skip split of R = [1, 1] over x + out: x takes [1 / (1 + a0), 0] before renormalising by |totals|.
    skip_x, skip_out = 1 / (1 + a0), a0 / (1 + a0) + 1.0
    scale = 2 / (skip_x + skip_out)
    # The attended branch [a0/(1+a0), 1] passes the identity output layer; A·V gives half to A, half to V:
    # R^A_j = A_j * V_j·R_out / out / 2 per feature, V = context.
    branch = np.array([a0 / (1 + a0), 1.0]) * scale
    np.testing.assert_allclose(relevance_attention[0, 0, 0].numpy(), branch / 2, rtol=1e-7)  # ε = 1e-9 in divisions
    # Conserved but for one term: key 1's score q·k1 is exactly 0, and the matmul rule gives a
    # zero output no relevance (x / 0 is taken as 0), so R^A_1 = 0.5 stops there.
    total = relevance_x.sum() + relevance_context.sum()
    assert total.item() == pytest.approx(2.0 - branch[1] / 2, rel=1e-7)
    np.testing.assert_allclose(output[0, 0].numpy(), [1 + a0, a1])
    # The query path goes to x: skip share 1/(1+a0) plus Q·Kᵀ's half of R^A_0, halved again, a0/(4(1+a0)).
    # The key/value paths go to the context: token 0 gets a0/(4(1+a0)) by its key and a0/(2(1+a0)) by its
    # value; token 1 only its value's half of R^A_1 = 1/2 (its key meets the zero score).
    np.testing.assert_allclose(relevance_x[0, 0].numpy(), [1 / (1 + a0) + a0 / (4 * (1 + a0)), 0.0], rtol=1e-7)
    np.testing.assert_allclose(
        relevance_context[0].numpy(), [[3 * a0 / (4 * (1 + a0)), 0.0], [0.0, 0.5]], rtol=1e-7, atol=1e-12
    )


@pytest.mark.parametrize("architecture", ["single_stream", "dual_stream"])
def test_a_contrast_starts_lrp_at_plus_and_minus_one_and_conserves_their_sum(
    builtin_adapters: dict, architecture: str
) -> None:
    """LRP of "A vs B" starts at +1 on A's logit and -1 on B's: the input's relevance totals 0, and it is
    neither A's relevance nor B's."""
    adapter, item = builtin_adapters[architecture], heldout_item(architecture)
    recorder = ActivationRecorder(adapter.model)
    with torch.no_grad():
        logits = adapter.forward(item.image, item.text).output.reshape(-1)
    recorder.close()
    first, second = (int(i) for i in torch.argsort(logits, descending=True)[:2])
    contrast = propagate(adapter.model, recorder, first, versus=second)
    alone = propagate(adapter.model, recorder, first)
    assert contrast.output == 0.0
    assert contrast.input_total == pytest.approx(0.0, abs=1e-4)
    difference = sum(float((c - a).abs().sum()) for c, a in zip(contrast.attention, alone.attention, strict=True))
    assert difference > 1e-3 * sum(float(a.abs().sum()) for a in alone.attention)
    frame, total = attention_relevance(adapter, item, "predicted vs runner-up")
    assert total == pytest.approx(0.0, abs=1e-4) and np.abs(frame).sum() > 0
