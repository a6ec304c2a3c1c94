"""The committed built-in models: accuracy of the weights, attention maps, token deletion."""

from __future__ import annotations

import pytest
import torch

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.models import world
from vlinterpret_panel.models.dual_encoder import DualEncoderModel
from vlinterpret_panel.models.layers import ATTENTION_KINDS, BaseVLModel
from vlinterpret_panel.models.registry import (
    BUILTIN_MODELS,
    evaluate_retrieval,
    evaluate_vqa_by_kind,
    images_to_pixels,
    load_builtin_model,
    texts_to_ids,
    vqa_batch,
)

HELDOUT = range(world.HELDOUT_SEED_START, world.HELDOUT_SEED_START + 4)
HELDOUT_300 = range(world.HELDOUT_SEED_START, world.HELDOUT_SEED_START + 300)


@pytest.fixture(scope="module", params=BUILTIN_MODELS)
def builtin(request: pytest.FixtureRequest) -> BaseVLModel:
    torch.manual_seed(0)
    model, config = load_builtin_model(request.param)
    assert config.architecture == request.param
    assert not model.training
    return model


def _inputs(model: BaseVLModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small held-out batch with texts of different lengths (so some keys are padding)."""
    if isinstance(model, DualEncoderModel):
        scenes = [world.scene_for_seed(seed) for seed in HELDOUT]
        text_ids, text_mask = texts_to_ids([world.make_caption(scene) for scene in scenes])
        return text_ids, text_mask, images_to_pixels([scene.image for scene in scenes])
    text_ids, text_mask, pixels, _ = vqa_batch(HELDOUT)
    return text_ids, text_mask, pixels


def _score(model: BaseVLModel, output_logits: torch.Tensor) -> torch.Tensor:
    """One scalar per example: matching-pair similarity or the top answer logit."""
    if isinstance(model, DualEncoderModel):
        return output_logits.diagonal()
    return output_logits.max(-1).values


def test_dual_encoder_reaches_its_retrieval_target() -> None:
    model, _ = load_builtin_model("dual_encoder")
    assert isinstance(model, DualEncoderModel)
    assert evaluate_retrieval(model, num_examples=200) >= 0.95


@pytest.mark.parametrize(
    "name",
    ["single_stream", "dual_stream"],
)
def test_vqa_models_reach_the_97_percent_target(name: str) -> None:
    """The issue's 97% target on the first 300 held-out examples (the training script scores 2000).

    The committed weights answer 100% (single stream) and 99.45% (dual stream) of the 2000,
    so the subset leaves room for 9 errors. Each question kind must also reach 85% (~75 examples
    each), so a model answering "where" at chance (~25%) fails even when the others carry it.
    """
    model, _ = load_builtin_model(name)
    accuracy = evaluate_vqa_by_kind(model, num_examples=len(HELDOUT_300), batch_size=150)
    assert accuracy["all"] >= 0.97, accuracy
    assert all(accuracy[kind] >= 0.85 for kind in world.QUESTION_KINDS), accuracy


def test_attention_maps_are_softmax_rows(builtin: BaseVLModel) -> None:
    text_ids, text_mask, pixels = _inputs(builtin)
    assert not text_mask.all(), "the batch should contain padding"
    with torch.no_grad():
        output = builtin(text_ids, text_mask, pixels)
    assert output.attentions
    image_tokens = pixels.new_ones(output.image_positions.shape, dtype=torch.bool)
    if "image_cls" in output.stream_layout.get("image", ()):
        image_tokens = torch.cat([image_tokens[:, :1], image_tokens], dim=1)
    key_valid = {
        "text": output.text_mask,
        "image": image_tokens,
        "joint": torch.cat([output.text_mask, image_tokens], dim=1),
    }
    for attention in output.attentions:
        assert attention.kind in ATTENTION_KINDS
        probs = attention.probs
        valid = key_valid[attention.key_stream][:, None, None, :].expand_as(probs)
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)
        assert (probs[~valid] == 0).all(), "padding keys get no attention"
        assert probs.shape[-2] == key_valid[attention.query_stream].shape[1]
    for stream, states in output.hidden_states.items():
        assert all(state.shape[1] == key_valid[stream].shape[1] for state in states)


def test_gradients_reach_every_attention_map(builtin: BaseVLModel) -> None:
    text_ids, text_mask, pixels = _inputs(builtin)
    output = builtin(text_ids, text_mask, pixels)
    for attention in output.attentions:
        attention.probs.retain_grad()
    _score(builtin, output.logits).sum().backward()
    last = len(getattr(builtin, "cross_layers", [])) - 1
    # The answer is read from the text stream, so the image branch of the last co-attention
    # layer cannot affect it: no gradient reaches those two maps.
    unreachable = {f"cross_layers.{last}.image_cross", f"cross_layers.{last}.image_self"}
    for attention in output.attentions:
        if attention.name in unreachable:
            assert attention.probs.grad is None, attention.name
            continue
        assert attention.probs.grad is not None, attention.name
        assert attention.probs.grad.abs().sum() > 0, attention.name


def test_token_deletion_keeps_positions_and_changes_outputs(builtin: BaseVLModel) -> None:
    text_ids, text_mask, pixels = _inputs(builtin)
    num_patches = builtin.config.num_patches
    with torch.no_grad():
        full = builtin(text_ids, text_mask, pixels)
        same = builtin(
            text_ids,
            text_mask,
            pixels,
            text_keep=torch.arange(text_ids.shape[1]),
            image_keep=torch.arange(num_patches),
        )
        image_keep = torch.arange(0, num_patches, 2)
        text_keep = torch.tensor([0, 2, 3])
        reduced = builtin(text_ids, text_mask, pixels, text_keep=text_keep, image_keep=image_keep)
    assert torch.allclose(full.logits, same.logits, atol=1e-5)
    assert reduced.image_positions[0].tolist() == image_keep.tolist()
    assert reduced.text_positions[0].tolist() == text_keep.tolist()
    assert reduced.logits.shape == full.logits.shape
    assert not torch.allclose(_score(builtin, full.logits), _score(builtin, reduced.logits))
    for attention in reduced.attentions:
        if attention.kind in ("self", "image_self", "cross_text_to_image"):
            assert attention.probs.shape[-1] >= len(image_keep)
    with pytest.raises(ValueError, match="CLS"):
        builtin(text_ids, text_mask, pixels, text_keep=torch.tensor([1, 2]))


def test_unknown_model_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="single_stream, dual_stream, dual_encoder") as info:
        load_builtin_model("vilbert")
    assert isinstance(info.value, VLIError)
