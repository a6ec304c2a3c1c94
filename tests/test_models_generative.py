"""The built-in generative model: its forward outputs, causal mask, token deletion, greedy generation, the
committed weights' held-out accuracy, and the world's generative helpers (descriptions, scoring, ground truth)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlinterpret_panel.models import generative, world
from vlinterpret_panel.models.generative import GenerativeConfig, GenerativeModel
from vlinterpret_panel.models.layers import SelfAttentionBlock
from vlinterpret_panel.models.registry import (
    GENERATIVE_MODELS,
    load_builtin_model,
    load_generative_model,
    weight_paths,
)

HELDOUT = world.HELDOUT_SEED_START


@pytest.fixture(scope="module")
def model() -> GenerativeModel:
    loaded, config = load_builtin_model("generative")
    assert isinstance(loaded, GenerativeModel) and isinstance(config, GenerativeConfig)
    assert not loaded.training
    return loaded


def _teacher_forced(tasks: list[str], seed: int = HELDOUT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels, ids and mask of prompt + reference answer for held-out examples of the given tasks."""
    drawn = [world.generative_example_for_seed(seed + i, task) for i, task in enumerate(tasks)]
    ids = [generative.encode_prompt(e.prompt) + generative.encode_answer(e.reference) for _, e in drawn]
    input_ids, input_mask = generative.pad_ids(ids)
    return generative.images_to_pixels([scene.image for scene, _ in drawn]), input_ids, input_mask


def test_forward_shapes_and_layout(model: GenerativeModel) -> None:
    pixels, input_ids, input_mask = _teacher_forced(["question", "describe", "question"])
    with torch.no_grad():
        output = model(pixels, input_ids, input_mask)
    batch, length = input_ids.shape
    patches, config = model.config.num_patches, model.config
    sequence = length + patches
    assert output.logits.shape == (batch, sequence, config.vocab_size)
    assert len(output.attentions) == config.num_layers
    assert all(a.shape == (batch, config.num_heads, sequence, sequence) for a in output.attentions)
    assert len(output.hidden_states) == config.num_layers + 1
    assert all(h.shape == (batch, sequence, config.hidden_size) for h in output.hidden_states)
    layout = output.layout
    codes = {name: code for code, name in enumerate(generative.MODALITIES)}
    for row in range(batch):
        real = int(input_mask[row].sum())
        modality = layout.modality[row].tolist()
        assert modality[0] == codes["special"] and layout.source_index[row, 0] == 0  # [BOS]
        assert modality[1 : 1 + patches] == [codes["image"]] * patches
        assert layout.source_index[row, 1 : 1 + patches].tolist() == list(range(patches))
        assert layout.source_index[row, 1 + patches :].tolist() == list(range(1, length))
        tokens = generative.token_strings(input_ids[row])
        for index in range(1, length):
            expected = "pad" if index >= real else "special" if tokens[index] in generative.SPECIAL_TOKENS else "text"
            assert modality[patches + index] == codes[expected]
        assert int(layout.last_position[row]) == patches + real - 1
        assert bool(layout.sequence_mask[row].sum() == real + patches)


def test_attention_is_causal_and_rows_sum_to_one(model: GenerativeModel) -> None:
    pixels, input_ids, input_mask = _teacher_forced(["describe", "question"])
    with torch.no_grad():
        output = model(pixels, input_ids, input_mask)
    sequence = output.logits.shape[1]
    future = ~torch.ones(sequence, sequence, dtype=torch.bool).tril()
    padding = ~output.layout.sequence_mask
    for probs in output.attentions:
        assert (probs[:, :, future] == 0).all(), "a position attends to a later one"
        assert (probs.transpose(1, 3)[padding] == 0).all(), "a position attends to padding"
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_attention_maps_are_in_the_graph(model: GenerativeModel) -> None:
    pixels, input_ids, input_mask = _teacher_forced(["question"])
    output = model(pixels, input_ids, input_mask)
    for probs in output.attentions:
        probs.retain_grad()
    output.next_token_logits().max().backward()
    assert all(probs.grad is not None and probs.grad.abs().sum() > 0 for probs in output.attentions)


def test_token_deletion_keeps_original_positions(model: GenerativeModel) -> None:
    pixels, input_ids, input_mask = _teacher_forced(["describe"])
    length = int(input_mask.sum())
    input_ids, input_mask = input_ids[:, :length], input_mask[:, :length]
    image_keep = torch.tensor([0, 5, 6, 15])
    text_keep = torch.tensor([0, 1, 3, length - 1])
    with torch.no_grad():
        full = model(pixels, input_ids, input_mask)
        kept = model(pixels, input_ids, input_mask, image_keep=image_keep, text_keep=text_keep)
    patches = model.config.num_patches
    sequence_rows = torch.cat([torch.tensor([0]), 1 + image_keep, patches + text_keep[1:]])
    assert kept.layout.source_index[0].tolist() == [0, *image_keep.tolist(), *text_keep[1:].tolist()]
    # Embeddings depend on each token and its own position only: the kept rows are the full run's, to float32
    # rounding (the patch projection over fewer rows may take another matmul kernel: 1.2e-6 on an AVX-512 machine).
    embedded = kept.hidden_states[0][0]
    torch.testing.assert_close(embedded, full.hidden_states[0][0, sequence_rows], rtol=1e-5, atol=1e-5)
    assert int(kept.layout.last_position[0]) == len(sequence_rows) - 1
    # Causality: deleting the last text tokens leaves every earlier position's logits as they were.
    with torch.no_grad():
        shorter = model(pixels, input_ids[:, : length - 3], input_mask[:, : length - 3])
    torch.testing.assert_close(shorter.logits[0], full.logits[0, : patches + length - 3], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="BOS"):
        model(pixels, input_ids, input_mask, text_keep=torch.arange(1, length))
    with pytest.raises(ValueError, match="last real token"):
        model(pixels, input_ids, input_mask, text_keep=torch.arange(length - 1))


def test_greedy_generation_is_repeated_argmax_and_batches_like_single_runs(model: GenerativeModel) -> None:
    drawn = [world.generative_example_for_seed(HELDOUT + 7 + i, t) for i, t in enumerate(["describe", "question"])]
    pixels = generative.images_to_pixels([scene.image for scene, _ in drawn])
    prompts = [generative.encode_prompt(example.prompt) for _, example in drawn]
    batched = model.generate(pixels, prompts)
    for row, prompt in enumerate(prompts):
        single = model.generate(pixels[row : row + 1], [prompt])
        steps = int(single.lengths[0])
        assert single.ids[0, steps - 1] == generative.EOS_ID
        assert torch.equal(batched.ids[row, :steps], single.ids[0, :steps])
        assert (batched.ids[row, steps:] == generative.PAD_ID).all()
        torch.testing.assert_close(batched.distributions[row, :steps], single.distributions[0], rtol=1e-4, atol=1e-5)
        sequence = list(prompt)
        with torch.no_grad():
            for step in range(steps):
                input_ids = torch.tensor([sequence])
                logits = model(pixels[row : row + 1], input_ids, torch.ones_like(input_ids, dtype=torch.bool))
                distribution = logits.next_token_logits()[0].softmax(-1)
                token = int(distribution.argmax())
                assert token == int(single.ids[0, step])
                torch.testing.assert_close(single.probabilities[0, step], distribution[token])
                torch.testing.assert_close(single.distributions[0, step], distribution)
                sequence.append(token)
    texts = [generative.decode(row) for row in batched.ids]
    assert world.description_correct(drawn[0][0], texts[0]), texts[0]


def test_committed_weights_keep_their_heldout_results(model: GenerativeModel) -> None:
    """A small sample of the training script's held-out evaluation (2000 questions, 1000 descriptions).

    The shipped weights answer 85.1% of the questions (the issue's target, 95%, is not met: see
    benchmarks/RESULTS.md) and describe 99.9% of the scenes fully right; this guards those.
    """
    scores = generative.evaluate(model, num_questions=200, num_descriptions=100, batch_size=100)
    assert scores["answer_exact_match"] >= 0.8, scores
    assert all(scores[f"answer_exact_match_{kind}"] >= 0.65 for kind in world.QUESTION_KINDS), scores
    assert scores["description_correct"] >= 0.97, scores


def test_registry_and_metrics_of_the_committed_weights() -> None:
    assert GENERATIVE_MODELS == ("generative",)
    assert isinstance(load_generative_model(), GenerativeModel)
    metrics = json.loads(weight_paths("generative")[1].read_text())["metrics"]
    assert metrics["heldout_answer_exact_match"] >= 0.85
    assert metrics["heldout_description_correct"] >= 0.99
    assert metrics["heldout_examples"] >= 2000 and metrics["heldout_descriptions"] >= 1000


def test_vocabularies_of_the_existing_models_are_unchanged() -> None:
    existing = ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "what", "color", "shape", "is", "the", "object", "there", "a")
    existing += ("where", "and", "?", "circle", "square", "triangle", "red", "green", "blue", "yellow")
    assert existing == world.VOCAB
    assert world.encode("is there a red square?") == [1, 7, 10, 11, 18, 16, 14, 2]
    assert generative.VOCAB[: len(world.VOCAB)] == world.VOCAB
    assert len(set(generative.VOCAB)) == len(generative.VOCAB)


def test_a_causal_mask_that_allows_everything_changes_nothing() -> None:
    """The optional ``attention_mask`` of the shared layers leaves the existing models' path bitwise as it was."""
    torch.manual_seed(0)
    block = SelfAttentionBlock(32, 4, 64)
    x = torch.randn(2, 5, 32)
    key_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    before = block(x, key_mask)
    after = block(x, key_mask, torch.ones(2, 5, 5, dtype=torch.bool))
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_tokenizer_covers_every_prompt_and_reference() -> None:
    for seed in range(300):
        for task in world.GENERATIVE_TASKS:
            _, example = world.generative_example_for_seed(seed, task)
            prompt, answer = generative.encode_prompt(example.prompt), generative.encode_answer(example.reference)
            assert generative.UNK_ID not in prompt + answer
            assert (
                prompt[0] == generative.BOS_ID and prompt[-1] == generative.SEP_ID and answer[-1] == generative.EOS_ID
            )
            assert generative.decode(answer) == example.reference
            assert len(prompt) + len(answer) - 1 <= GenerativeConfig().max_text_length
    assert generative.tokenize("Describe the Scene") == ["describe", "the", "scene"]
    assert generative.decode([generative.BOS_ID, 4, generative.EOS_ID, 5]) == "what"


def test_examples_for_seeds_match_the_vqa_world() -> None:
    for seed in range(20):
        scene, example = world.generative_example_for_seed(seed, "question")
        vqa_scene, vqa = world.vqa_example_for_seed(seed)
        assert np.array_equal(scene.image, vqa_scene.image)
        assert (example.prompt, example.reference) == (vqa.question, vqa.answer)
        assert np.array_equal(example.target_mask, vqa.target_mask)
        described, description = world.generative_example_for_seed(seed, "describe")
        assert np.array_equal(described.image, scene.image)
        assert description.prompt == world.DESCRIBE_PROMPT
        assert description.reference == world.describe_scene(scene)
    with pytest.raises(ValueError, match="describe"):
        world.generative_example_for_seed(0, "caption")


def _two_object_scene() -> world.Scene:
    for seed in range(1000):
        scene = world.scene_for_seed(seed)
        rows = {o.row for o in scene.objects}
        if len(scene.objects) == 2 and len(rows) == 2:
            return scene
    raise AssertionError("no two-object scene")


def test_descriptions_are_scored_in_full() -> None:
    scene = _two_object_scene()
    first, second = sorted(scene.objects, key=lambda o: (o.row, o.col))
    reference = world.describe_scene(scene)
    assert reference == (
        f"a {first.color} {first.shape} at the {first.quadrant} and a {second.color} {second.shape} at the "
        f"{second.quadrant}"
    )
    assert world.description_correct(scene, reference)
    swapped = " and ".join(reference.split(" and ")[::-1])
    assert world.description_correct(scene, swapped), "the order of the phrases is not scored"
    assert not world.description_correct(scene, reference.split(" and ")[0])
    assert not world.description_correct(scene, reference + " and " + reference.split(" and ")[0])
    wrong_place = "bottom" if first.quadrant.startswith("top") else "top"
    moved = reference.replace(f"at the {first.quadrant}", f"at the {wrong_place} {first.quadrant.split()[1]}", 1)
    assert not world.description_correct(scene, moved)
    assert not world.description_correct(scene, reference + " and")
    assert not world.description_correct(scene, "")
    assert world.answer_correct("top left", "top left") and not world.answer_correct("top left", "top")


def test_ground_truth_masks_of_generated_tokens() -> None:
    scene = _two_object_scene()
    union = np.logical_or.reduce(scene.masks)
    example = world.GenerativeExample("describe", world.DESCRIBE_PROMPT, world.describe_scene(scene), union)
    tokens = [*example.reference.split(), world.EOS_TOKEN]
    masks = world.generated_token_masks(scene, example, tokens)
    by_pair = {(o.color, o.shape): m for o, m in zip(scene.objects, scene.masks, strict=True)}
    for start in (0, 8):
        mask = by_pair[(tokens[start + 1], tokens[start + 2])]
        named = [start + 1, start + 2, start + 5, start + 6]
        assert all(masks[i] is mask for i in named)
        assert all(masks[i] is None for i in range(start, start + 7) if i not in named)
    assert masks[7] is None and masks[-1] is None  # "and", [EOS]
    absent = next((c, s) for c in world.COLOR_NAMES for s in world.SHAPES if (c, s) not in by_pair)
    assert world.generated_token_masks(scene, example, ["a", *absent, "at", "the", "top", "left"]) == [None] * 7
    yes_scene, yes = next(
        pair for pair in map(world.vqa_example_for_seed, range(100)) if pair[1].answer in ("yes", "top left")
    )
    question = world.GenerativeExample("question", yes.question, yes.answer, yes.target_mask)
    masks = world.generated_token_masks(yes_scene, question, [*yes.answer.split(), world.EOS_TOKEN])
    assert all(m is yes.target_mask for m in masks[:-1]) and masks[-1] is None
    no = world.GenerativeExample("question", "is there a red circle?", "no", np.zeros((64, 64), bool))
    assert world.generated_token_masks(yes_scene, no, ["no", world.EOS_TOKEN]) == [None, None]
