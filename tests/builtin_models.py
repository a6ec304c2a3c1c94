"""The three built-in answer and retrieval models and a held-out example for each, as the LRP tests use them."""

from __future__ import annotations

from vlinterpret_panel.adapters.base import ModelInput
from vlinterpret_panel.models import world

BUILTIN_MODELS = ("single_stream", "dual_stream", "dual_encoder")


def heldout_item(architecture: str, seed: int = 3) -> ModelInput:
    """Held-out scene ``seed`` with its question (its caption for the dual encoder), label and target mask."""
    scene, question = world.vqa_example_for_seed(world.HELDOUT_SEED_START + seed)
    text = world.make_caption(scene) if architecture == "dual_encoder" else question.question
    return ModelInput(f"seed{seed}", scene.image, text, question.answer, question.target_mask)
