"""AttnLRP: its rules on hand-worked numbers, conservation on the built-in models, and agreement with an
independent computation (AttnLRP as a modified gradient × input, as its authors' library computes it)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from tests.builtin_models import BUILTIN_MODELS, heldout_item
from vlinterpret_panel.models import world
from vlinterpret_panel.relevancy.attnlrp_rules import (
    add_rule,
    layer_norm_rule,
    linear_rule,
    product_rule,
    softmax_rule,
    token_relevance,
)

STACKS = {"joint": "layers", "text": "text_layers", "image": "image_layers"}


def _double(*values: list) -> list[torch.Tensor]:
    return [torch.tensor(value, dtype=torch.float64) for value in values]


def test_linear_epsilon_rule_by_hand() -> None:
    # x = [1, 2], z_0 = 1 - 2 + 2 (bias) = 1, z_1 = 3 + 1 = 4. R = [1, 1] -> R/z = [1, 0.25].
    # R_0 = 1 * (1 * 1 + 3 * 0.25) = 1.75, R_1 = 2 * (-1 * 1 + 0.5 * 0.25) = -1.75; the bias keeps 2 * 1 = 2.
    inputs, weight, bias, relevance = _double([1.0, 2.0], [[1.0, -1.0], [3.0, 0.5]], [2.0, 0.0], [1.0, 1.0])
    result, kept = linear_rule(inputs, weight, bias, relevance)
    np.testing.assert_allclose(result.numpy(), [1.75, -1.75], rtol=1e-8)
    assert kept == pytest.approx(2.0, rel=1e-8)


def test_softmax_rule_by_hand() -> None:
    # x = [0, ln 2, ln 5]: s = [1, 2, 5] / 8. R' = [1, 0, 0] (sum 1): R_i = x_i (R'_i - s_i) = [0, -ln2/4, -5 ln5/8];
    # the bias term keeps R'_0 (1 - x_0 + s.x) = 1 + ln2/4 + 5 ln5/8, so the two add up to R' = 1.
    inputs, relevance = _double([0.0, math.log(2), math.log(5)], [1.0, 0.0, 0.0])
    result, kept = softmax_rule(inputs, relevance)
    np.testing.assert_allclose(result.numpy(), [0.0, -math.log(2) / 4, -5 * math.log(5) / 8], rtol=1e-12)
    assert kept == pytest.approx(1 + math.log(2) / 4 + 5 * math.log(5) / 8, rel=1e-12)


def test_softmax_rule_gives_masked_keys_nothing() -> None:
    inputs, relevance = _double([0.0, math.log(3), torch.finfo(torch.float64).min], [0.5, 0.5, 0.0])
    result, _ = softmax_rule(inputs, relevance)
    # Unmasked: s = [1/4, 3/4], R' sums to 1: R = [0, ln3 (0.5 - 0.75)]; the masked key gets exactly 0.
    np.testing.assert_allclose(result.numpy(), [0.0, -math.log(3) / 4, 0.0], atol=1e-12)


def test_layer_norm_rule_holds_std_constant() -> None:
    # x = [1, 3]: mean 2, std 1 (eps 0), y = [-1, 1] = [(x0 - x1)/2, (x1 - x0)/2]. R = [1, 0] on y_0 = -1:
    # x0 contributed +0.5 and x1 -1.5 to y_0, so R_x = [0.5, -1.5] / -1 = [-0.5, 1.5]; β = 0 keeps nothing.
    norm = nn.LayerNorm(2, eps=0.0).double()
    inputs, relevance = _double([1.0, 3.0], [1.0, 0.0])
    result, kept = layer_norm_rule(norm, inputs, relevance)
    np.testing.assert_allclose(result.numpy(), [-0.5, 1.5], rtol=1e-8)
    assert kept == pytest.approx(0.0, abs=1e-8)  # only the ε stabiliser
    with torch.no_grad():
        norm.bias.fill_(0.5)
    # y = [-0.5, 1.5]: β keeps 0.5 * R_0 / y_0 = -1, and the input the rest, 1 - (-1) = 2.
    result, kept = layer_norm_rule(norm, inputs, relevance)
    assert kept == pytest.approx(-1.0, rel=1e-8)
    assert result.sum().item() == pytest.approx(2.0, rel=1e-8)


def test_product_rule_gives_each_operand_half_of_each_term() -> None:
    # [1, 2] . [3, 4] = 3 + 8 = 11; R = 1: the terms get 3/11 and 8/11, half to each operand.
    left, right, relevance = _double([[1.0, 2.0]], [[3.0], [4.0]], [[1.0]])
    result_left, result_right = product_rule(left, right, relevance)
    np.testing.assert_allclose(result_left.numpy(), [[3 / 22, 8 / 22]], rtol=1e-8)
    np.testing.assert_allclose(result_right.numpy(), [[3 / 22], [8 / 22]], rtol=1e-8)


def test_add_rule_splits_in_proportion() -> None:
    first, second, relevance = _double([1.0], [-3.0], [2.0])
    result_first, result_second = add_rule(first, second, relevance)
    # R (a, b) / (a + b) = 2 * (1, -3) / -2 = (-1, 3): it conserves, signs and all.
    np.testing.assert_allclose([result_first.item(), result_second.item()], [-1.0, 3.0], rtol=1e-8)


@pytest.mark.parametrize("architecture", BUILTIN_MODELS)
def test_attnlrp_conserves_relevance_on_every_built_in_model(builtin_adapters: dict, architecture: str) -> None:
    for seed in range(3):
        values, result = token_relevance(builtin_adapters[architecture], heldout_item(architecture, seed))
        # What reaches the embeddings plus what the bias terms keep is the explained value, to 1e-4.
        assert abs(result.conservation_error) < 1e-4, (seed, result)
        assert result.output > 1.0
        assert values.sum() == pytest.approx(result.input_total, rel=1e-9)
        assert all(np.abs(part.numpy()).sum() > 0 for part in result.inputs.values())


@pytest.mark.parametrize("architecture", ["single_stream", "dual_stream"])
def test_a_contrast_explains_the_difference_of_the_two_logits(builtin_adapters: dict, architecture: str) -> None:
    adapter = builtin_adapters[architecture]
    item = heldout_item(architecture)
    logits = adapter.forward(item.image, item.text).output.detach().reshape(-1).double()
    first, second = torch.topk(logits, 2).indices.tolist()
    _, result = token_relevance(adapter, item, "predicted vs runner-up")
    assert result.output == pytest.approx(float(logits[first] - logits[second]), rel=1e-5)
    assert abs(result.conservation_error) < 1e-4


class _ModifiedGradients(TorchFunctionMode):
    """AttnLRP as gradient × input with the rules' local changes (LXT's efficient form), for an independent check:
    GELU and L2 normalisation pass the relevance (gradient out/in), LayerNorm's std is constant, and a
    product of two computed tensors gives each operand half of its gradient."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is nn.functional.gelu or func is nn.functional.normalize:
            x = args[0]
            y = func(*args, **kwargs)
            return x * torch.where(x == 0, 0.0, y / x).detach()
        if func is nn.functional.layer_norm:
            return _layer_norm_constant_std(*args, **kwargs)
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__):
            left, right = args
            if left.requires_grad and right.requires_grad:
                return (left @ right.detach() + left.detach() @ right) / 2
        return func(*args, **kwargs)


def _layer_norm_constant_std(x, normalized_shape, weight, bias, eps=1e-5):  # type: ignore[no-untyped-def]
    centred = x - x.mean(dim=-1, keepdim=True)
    std = (centred.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt().detach()
    return centred / std * weight + bias


@contextmanager
def _leaf_inputs(model: nn.Module, leaves: dict) -> Iterator[None]:
    """Make each stream's first-block input a leaf that keeps its gradient."""

    def hook_for(stream: str):  # type: ignore[no-untyped-def]
        def replace(module, args):  # type: ignore[no-untyped-def]
            leaves[stream] = args[0].detach().requires_grad_()
            return (leaves[stream], *args[1:])

        return replace

    handles = [
        getattr(model, name)[0].register_forward_pre_hook(hook_for(stream))
        for stream, name in STACKS.items()
        if hasattr(model, name)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("architecture", BUILTIN_MODELS)
def test_attnlrp_equals_modified_gradient_times_input(builtin_adapters: dict, architecture: str) -> None:
    adapter = builtin_adapters[architecture]
    item = heldout_item(architecture)
    _, result = token_relevance(adapter, item)
    ids, mask = world.encode_batch([item.text])
    pixels = torch.from_numpy(item.image[None]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    leaves: dict = {}
    with _leaf_inputs(adapter.model, leaves), _ModifiedGradients(), torch.enable_grad():
        logits = adapter.model(torch.from_numpy(ids), torch.from_numpy(mask), pixels).logits
        explained = logits[0, int(logits[0].argmax())] if architecture != "dual_encoder" else logits[0, 0]
        explained.backward()
    assert set(leaves) == set(result.inputs)
    for stream, leaf in leaves.items():
        expected = (leaf * leaf.grad).detach().double()
        scale = expected.abs().max().item()
        np.testing.assert_allclose(result.inputs[stream].numpy(), expected.numpy(), atol=1e-4 * scale)


def test_one_recorded_pass_serves_lrp_and_attnlrp_alike(builtin_adapters: dict) -> None:
    from vlinterpret_panel.relevancy.capture import capture_for
    from vlinterpret_panel.relevancy.lrp import attention_relevance

    adapter, item = builtin_adapters["dual_stream"], heldout_item("dual_stream")
    both, _, _ = capture_for(adapter, item, ["transformer_attribution", "attnlrp"])
    np.testing.assert_array_equal(both.token_relevance, token_relevance(adapter, item)[0])
    np.testing.assert_array_equal(both.attention_relevance, attention_relevance(adapter, item)[0])
