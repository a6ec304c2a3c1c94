"""Load the built-in models from the committed weights, and score them on held-out scenes."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Literal, overload

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.models import world
from vlinterpret_panel.models.dual_encoder import DualEncoderModel
from vlinterpret_panel.models.dual_stream import DualStreamModel
from vlinterpret_panel.models.generative import GenerativeConfig, GenerativeModel
from vlinterpret_panel.models.layers import BaseVLModel, ModelConfig, pixels_from_uint8
from vlinterpret_panel.models.single_stream import SingleStreamModel

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODEL_CLASSES: dict[str, type[BaseVLModel]] = {
    "single_stream": SingleStreamModel,
    "dual_stream": DualStreamModel,
    "dual_encoder": DualEncoderModel,
}
BUILTIN_MODELS: tuple[str, ...] = tuple(MODEL_CLASSES)
"""The VQA and dual-encoder models (``BaseVLModel``): the adapters, tests and relevancy methods iterate over these."""
GENERATIVE_MODELS: tuple[str, ...] = ("generative",)
"""Built-in models that generate their answer word by word (``models.generative``), kept apart
from ``BUILTIN_MODELS`` because their forward signature and outputs differ."""


class UnknownModelError(VLIError, ValueError):
    """An unknown built-in model name (a ``ValueError`` and the project's ``VLIError``)."""


def build_model(config: ModelConfig) -> BaseVLModel:
    """A freshly initialised model of ``config.architecture``."""
    if config.architecture not in MODEL_CLASSES:
        raise UnknownModelError(_unknown_message(config.architecture))
    return MODEL_CLASSES[config.architecture](config)


def _unknown_message(name: str) -> str:
    return f"unknown built-in model {name!r}; valid choices: {', '.join(BUILTIN_MODELS + GENERATIVE_MODELS)}"


def weight_paths(name: str, directory: Path = WEIGHTS_DIR) -> tuple[Path, Path]:
    """The safetensors file and JSON config file of a built-in model."""
    return directory / f"{name}.safetensors", directory / f"{name}.json"


def save_model(
    model: BaseVLModel | GenerativeModel, directory: Path = WEIGHTS_DIR, metrics: dict | None = None
) -> None:
    """Write the weights (safetensors) and a JSON config (plus training metrics) for a model."""
    directory.mkdir(parents=True, exist_ok=True)
    weights_path, config_path = weight_paths(model.config.architecture, directory)
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(weights_path))
    payload = {"config": asdict(model.config), "metrics": metrics or {}}
    config_path.write_text(json.dumps(payload, indent=2) + "\n")


# The overlap is intended: a literal "generative" gives the generative model, any other name a BaseVLModel.
@overload
def load_builtin_model(  # type: ignore[overload-overlap]
    name: Literal["generative"], directory: Path = WEIGHTS_DIR
) -> tuple[GenerativeModel, GenerativeConfig]: ...


@overload
def load_builtin_model(name: str, directory: Path = WEIGHTS_DIR) -> tuple[BaseVLModel, ModelConfig]: ...


def load_builtin_model(
    name: str, directory: Path = WEIGHTS_DIR
) -> tuple[BaseVLModel, ModelConfig] | tuple[GenerativeModel, GenerativeConfig]:
    """Load a committed built-in model (offline) in eval mode, with its config.

    ``"generative"`` gives a ``GenerativeModel`` and its ``GenerativeConfig``; the names of
    ``BUILTIN_MODELS`` a ``BaseVLModel`` and its ``ModelConfig``.
    """
    if name not in MODEL_CLASSES and name not in GENERATIVE_MODELS:
        raise UnknownModelError(_unknown_message(name))
    weights_path, config_path = weight_paths(name, directory)
    if not weights_path.exists() or not config_path.exists():
        raise VLIError(f"weights for built-in model {name!r} are missing in {directory}")
    fields = json.loads(config_path.read_text())["config"]
    state = load_file(str(weights_path))
    if name in GENERATIVE_MODELS:
        generative_config = GenerativeConfig(**fields)
        generative = GenerativeModel(generative_config)
        generative.load_state_dict(state)
        generative.eval()
        return generative, generative_config
    config = ModelConfig(**fields)
    model = build_model(config)
    model.load_state_dict(state)
    model.eval()
    return model, config


def load_generative_model(name: str = "generative", directory: Path = WEIGHTS_DIR) -> GenerativeModel:
    """Load a committed generative model (offline) in eval mode: ``load_builtin_model`` without the config."""
    if name not in GENERATIVE_MODELS:
        raise UnknownModelError(
            f"unknown built-in generative model {name!r}; valid choices: {', '.join(GENERATIVE_MODELS)}"
        )
    return load_builtin_model("generative", directory)[0]


def images_to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """``[H, W, 3]`` uint8 images to the ``[B, 3, H, W]`` float pixels the models take."""
    return pixels_from_uint8(torch.from_numpy(np.stack(images)))


def texts_to_ids(texts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[B, T]`` (int64) and validity mask ``[B, T]`` (bool) for texts."""
    ids, mask = world.encode_batch(texts, max_length)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def vqa_batch(
    seeds: range | list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Question ids, mask, pixels and answer ids for the VQA examples of the given seeds."""
    examples = [world.vqa_example_for_seed(seed) for seed in seeds]
    text_ids, text_mask = texts_to_ids([example.question for _, example in examples])
    pixels = images_to_pixels([scene.image for scene, _ in examples])
    answers = torch.tensor([world.ANSWER_TO_ID[example.answer] for _, example in examples])
    return text_ids, text_mask, pixels, answers


def evaluate_vqa(model: BaseVLModel, num_examples: int = 1000, batch_size: int = 250) -> float:
    """Answer accuracy on the first ``num_examples`` held-out seeds."""
    return evaluate_vqa_by_kind(model, num_examples, batch_size)["all"]


@torch.no_grad()
def evaluate_vqa_by_kind(model: BaseVLModel, num_examples: int = 1000, batch_size: int = 250) -> dict[str, float]:
    """Held-out answer accuracy overall (``"all"``) and per ``world.QUESTION_KINDS`` kind."""
    correct: list[bool] = []
    kinds: list[str] = []
    start = world.HELDOUT_SEED_START
    for offset in range(0, num_examples, batch_size):
        seeds = range(start + offset, start + min(offset + batch_size, num_examples))
        text_ids, text_mask, pixels, answers = vqa_batch(seeds)
        logits = model(text_ids, text_mask, pixels).logits
        correct.extend((logits.argmax(-1) == answers).tolist())
        kinds.extend(world.question_kind(world.vqa_example_for_seed(seed)[1].question) for seed in seeds)
    accuracy = {"all": sum(correct) / num_examples}
    for kind in world.QUESTION_KINDS:
        hits = [ok for ok, other in zip(correct, kinds, strict=True) if other == kind]
        if hits:
            accuracy[kind] = sum(hits) / len(hits)
    return accuracy


@torch.no_grad()
def evaluate_retrieval(model: DualEncoderModel, num_examples: int = 1000, num_candidates: int = 8) -> float:
    """Top-1 accuracy picking each held-out image's caption among ``num_candidates`` captions.

    The distractors are captions of other held-out scenes, drawn with a fixed seed, skipping
    scenes with the same set of (colour, shape) pairs (their captions name the same objects).
    """
    scenes = [world.scene_for_seed(world.HELDOUT_SEED_START + i) for i in range(num_examples)]
    keys = [world.caption_key(scene) for scene in scenes]
    text_ids, text_mask = texts_to_ids([world.make_caption(scene) for scene in scenes])
    positions = torch.arange(text_ids.shape[1]).expand_as(text_ids)
    text_embeds, _, _ = model.encode_text(text_ids, text_mask, positions)
    pixels = images_to_pixels([scene.image for scene in scenes])
    patch_positions = torch.arange(model.config.num_patches).expand(num_examples, -1)
    image_embeds, _, _ = model.encode_image(pixels, patch_positions)
    scores = (image_embeds @ text_embeds.T).numpy()
    rng = np.random.default_rng(0)
    correct = 0
    for index in range(num_examples):
        others = [j for j in rng.permutation(num_examples) if keys[j] != keys[index]]
        candidates = [index, *others[: num_candidates - 1]]
        correct += int(np.argmax(scores[index, candidates]) == 0)
    return correct / num_examples
