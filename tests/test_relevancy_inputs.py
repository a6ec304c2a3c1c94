"""The captured-input structure: constructors, padding, guards, errors and the method registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_relevancy_methods import ATTENTION, GRADIENT, single_stream
from vlinterpret_panel.adapters.base import AttentionCapture, ForwardCapture, HiddenCapture, ModelAdapter, ModelInput
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.relevancy import (
    Captured,
    available_methods,
    compute_relevancy,
    generic_relevancy,
    get_method,
    raw_attention,
    register,
    rollout,
)
from vlinterpret_panel.relevancy.common import normalize_rows, normalized_residual
from vlinterpret_panel.schema import ExampleRecord, records_to_dataset


def padded_single_stream() -> Captured:
    """The 3-token example padded to 4 tokens and 3 heads, NaN where the schema puts padding."""
    attention = np.full((2, 3, 4, 4), np.nan)
    gradient = np.full((2, 3, 4, 4), np.nan)
    attention[:, :2, :3, :3] = ATTENTION
    gradient[:, :2, :3, :3] = GRADIENT
    return Captured(
        attention=attention,
        attention_gradient=gradient,
        layer_kind=["self", "self"],
        modality=["text", "special", "image", "pad"],
        readout_tokens={"answer": 1},
    )


@pytest.mark.parametrize(
    ("method", "expected"),
    [("generic", [2.0, 0.0, 2.25]), ("rollout", [0.171875, 0.0, 0.4296875]), ("attention_gradcam", [0.5, 0.0, 1.0])],
)
def test_padded_tokens_and_heads_are_left_out(method, expected):
    result = compute_relevancy(padded_single_stream(), method)
    np.testing.assert_allclose(result.values[:3], expected)
    assert np.isnan(result.values[3])
    assert result.modality[3] == "pad"


def test_zero_rows_normalise_to_zero_not_nan():
    np.testing.assert_array_equal(normalize_rows(np.array([[0.0, 0.0], [1.0, 3.0]])), [[0.0, 0.0], [0.25, 0.75]])
    np.testing.assert_array_equal(normalized_residual(np.eye(2)), np.eye(2))


def test_rollout_guards_rows_that_sum_to_zero():
    # A head whose row 0 is all zero still gets the identity: M[0] = [1, 0, 0] -> rows never divide by 0.
    attention = np.zeros((1, 1, 3, 3))
    attention[0, 0, 1:, :] = 1 / 3
    captured = Captured(
        attention=attention, layer_kind=["self"], modality=["special", "text", "image"], readout_tokens={"cls": 1}
    )
    # M[1] = ([1/3, 1/3, 1/3] + [0, 1, 0]) / 2 = [1/6, 2/3, 1/6]
    np.testing.assert_allclose(rollout(captured).values, [1 / 6, 0.0, 1 / 6])


def test_invalid_inputs_raise_user_errors():
    with pytest.raises(VLIError, match="not a real token"):
        single_stream(readout_tokens={"answer": 3})
    with pytest.raises(VLIError, match="not a real token"):
        Captured(
            attention=padded_single_stream().attention,
            layer_kind=["self", "self"],
            modality=["text", "special", "image", "pad"],
            readout_tokens={"answer": 3},
        )
    with pytest.raises(VLIError, match="NaN"):
        broken = ATTENTION.copy()
        broken[1, 0, 0, 0] = np.nan
        single_stream(attention=broken)
    with pytest.raises(VLIError, match="attention_gradient has shape"):
        single_stream(attention_gradient=GRADIENT[:1])
    with pytest.raises(VLIError, match="unknown layer kind"):
        single_stream(layer_kind=["self", "decoder"])
    with pytest.raises(VLIError, match="no readout token"):
        single_stream(readout_tokens={})
    with pytest.raises(VLIError, match="choose one"):
        raw_attention(single_stream(readout_tokens={"answer": 1, "other": 0}))
    with pytest.raises(VLIError, match="'pad' must mark the tail"):
        single_stream(modality=["text", "pad", "image"])


def test_streams_follow_the_modules_not_the_modality_labels():
    # Token 0 is "special" but a text module's query: it belongs to the text stream.
    attention = np.zeros((2, 1, 3, 3))
    attention[0, 0, :2, :2] = 0.5
    attention[1, 0, 2, 2] = 1.0
    captured = Captured(
        attention=attention,
        layer_kind=["text_self", "image_self"],
        modality=["special", "text", "image"],
        readout_tokens={"answer": 0},
    )
    np.testing.assert_array_equal(captured.streams["text"], [True, True, False])
    np.testing.assert_array_equal(captured.streams["image"], [False, False, True])
    overlapping = attention.copy()
    overlapping[1, 0, 1, 2] = 1.0
    with pytest.raises(VLIError, match="disjoint"):
        _ = Captured(
            attention=overlapping,
            layer_kind=["text_self", "image_self"],
            modality=["special", "text", "image"],
            readout_tokens={"answer": 0},
        ).streams


def test_registry_lists_finds_and_rejects_methods():
    assert available_methods() == [
        "attention_gradcam",
        "attnlrp",
        "generic",
        "random",
        "raw_attention",
        "rollout",
        "transformer_attribution",
    ]
    assert get_method("generic") is generic_relevancy
    with pytest.raises(VLIError, match="unknown relevancy method"):
        get_method("lime")
    with pytest.raises(ValueError, match="registered twice"):
        register("generic", needs=["attention"])(raw_attention)


class ToyAdapter(ModelAdapter):
    """One self-attention layer over [CLS, word, patch]; two answers read at [CLS] (token 0)."""

    name = "toy"

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.scores = torch.randn(2, 3, 3, generator=generator)
        self.values = torch.randn(3, 4, generator=generator)
        self.head = torch.randn(4, 2, generator=generator)

    def forward(self, image: np.ndarray, text: str, *, keep_tokens: np.ndarray | None = None) -> ForwardCapture:
        probabilities = self.scores.softmax(dim=-1).requires_grad_(True)
        mixed = (probabilities @ self.values).mean(dim=0)
        return ForwardCapture(
            tokens=["[CLS]", text, "patch"],
            modality=["special", "text", "image"],
            token_box=np.full((3, 4), np.nan),
            attentions=[AttentionCapture("layer.0", "self", probabilities, [0, 1, 2], [0, 1, 2])],
            hidden_states=[HiddenCapture("layer.0", mixed, [0, 1, 2])],
            output=mixed[0] @ self.head,
            output_labels=["yes", "no"],
            readout_tokens={"answer": 0},
        )


def test_from_record_matches_an_independent_computation_from_autograd():
    adapter = ToyAdapter()
    record, info = adapter.run(
        ModelInput("toy-0", np.zeros((4, 4, 3), np.uint8), "red", label="yes"), target="no", gradients=True
    )
    captured = Captured.from_record(record, info)
    assert captured.target == "no"
    assert captured.readout_tokens == {"answer": 0}
    probabilities = adapter.scores.softmax(dim=-1).requires_grad_(True)
    score = ((probabilities @ adapter.values).mean(dim=0)[0] @ adapter.head)[1]
    (gradient,) = torch.autograd.grad(score, probabilities)
    weighted = (gradient * probabilities).clamp(min=0).mean(dim=0).detach().numpy()
    expected = (np.eye(3) + weighted)[0]
    expected[0] = 0
    np.testing.assert_allclose(generic_relevancy(captured).values, expected, rtol=1e-5, atol=1e-7)
    record.relevancy = {"generic": generic_relevancy(captured).values}
    record.check()


def test_from_dataset_reads_stored_attention_with_padding():
    adapter = ToyAdapter()
    short_record, info = adapter.run(ModelInput("a", np.zeros((4, 4, 3), np.uint8), "red"))
    longer = ExampleRecord(
        example_id="b",
        image=np.zeros((4, 4, 3), np.uint8),
        text="x",
        tokens=["[CLS]", "x", "y", "patch"],
        modality=["special", "text", "text", "image"],
        token_box=np.full((4, 4), np.nan, np.float32),
        attention=np.full((1, 2, 4, 4), 0.25, np.float32),
        hidden_states=np.zeros((1, 4, 3), np.float32),
        readout_tokens={"answer": 0},
    )
    ds = records_to_dataset([short_record, longer], info)
    stored = Captured.from_dataset(ds, "a")
    assert stored.n_tokens == 3 and stored.attention_gradient is None
    from_store = raw_attention(stored).values
    from_record = raw_attention(Captured.from_record(short_record, info)).values
    np.testing.assert_allclose(from_store[:3], from_record, atol=1e-6)
    assert np.isnan(from_store[3])
    np.testing.assert_allclose(raw_attention(Captured.from_dataset(ds, 1)).values, [0.0, 0.25, 0.25, 0.25])
