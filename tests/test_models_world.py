"""The synthetic scene world: determinism, exact masks, correct answers, tokenizer."""

from __future__ import annotations

import re

import numpy as np
import pytest

from vlinterpret_panel.models import world


def test_scenes_are_deterministic_per_seed() -> None:
    first, second = world.scene_for_seed(7), world.scene_for_seed(7)
    assert np.array_equal(first.image, second.image)
    assert first.objects == second.objects
    assert all(np.array_equal(a, b) for a, b in zip(first.masks, second.masks, strict=True))
    assert not np.array_equal(first.image, world.scene_for_seed(8).image)
    assert world.vqa_example_for_seed(3)[1].question == world.vqa_example_for_seed(3)[1].question


@pytest.mark.parametrize("seed", range(50))
def test_masks_match_object_pixels(seed: int) -> None:
    scene = world.scene_for_seed(seed)
    assert scene.image.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    assert scene.image.dtype == np.uint8
    assert 1 <= len(scene.objects) <= world.MAX_OBJECTS
    union = np.zeros(scene.image.shape[:2], dtype=bool)
    for obj, mask in zip(scene.objects, scene.masks, strict=True):
        assert mask.any()
        assert not (mask & union).any(), "objects overlap"
        union |= mask
        colors = scene.image[mask].astype(int)
        assert (colors == colors[0]).all(), "an object is one flat colour"
        assert np.abs(colors[0] - np.array(world.COLORS[obj.color])).max() <= world.COLOR_JITTER
        top, left, bottom, right = obj.bbox
        rows, cols = np.nonzero(mask)
        assert rows.min() >= top and rows.max() < bottom
        assert cols.min() >= left and cols.max() < right
    assert (scene.image[~union] == np.array(world.BACKGROUND)).all()
    assert len({(o.row, o.col) for o in scene.objects}) == len(scene.objects)
    assert len({(o.color, o.shape) for o in scene.objects}) == len(scene.objects)


def _expected(scene: world.Scene, question: str) -> tuple[str, np.ndarray]:
    """Answer a question from the scene description alone, independently of make_question."""
    empty = np.zeros(scene.image.shape[:2], dtype=bool)
    if match := re.fullmatch(r"what color is the (\w+)\?", question):
        hits = [i for i, o in enumerate(scene.objects) if o.shape == match[1]]
        assert len(hits) == 1, "question refers to a unique object"
        return scene.objects[hits[0]].color, scene.masks[hits[0]]
    if match := re.fullmatch(r"what shape is the (\w+) object\?", question):
        hits = [i for i, o in enumerate(scene.objects) if o.color == match[1]]
        assert len(hits) == 1, "question refers to a unique object"
        return scene.objects[hits[0]].shape, scene.masks[hits[0]]
    if match := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        pair = (match[1], match[2])
        hits = [i for i, o in enumerate(scene.objects) if (o.color, o.shape) == pair]
        return ("yes", scene.masks[hits[0]]) if hits else ("no", empty)
    match = re.fullmatch(r"where is the (\w+) (\w+)\?", question)
    assert match, question
    hits = [i for i, o in enumerate(scene.objects) if (o.color, o.shape) == (match[1], match[2])]
    assert len(hits) == 1
    obj = scene.objects[hits[0]]
    rows, cols = np.nonzero(scene.masks[hits[0]])
    half = world.IMAGE_SIZE / 2
    vertical = "top" if rows.mean() < half else "bottom"
    horizontal = "left" if cols.mean() < half else "right"
    assert obj.quadrant == f"{vertical} {horizontal}"
    return obj.quadrant, scene.masks[hits[0]]


def test_answers_and_target_masks_are_correct_by_construction() -> None:
    kinds = set()
    answers = set()
    for seed in range(600):
        scene, example = world.vqa_example_for_seed(seed)
        answer, mask = _expected(scene, example.question)
        assert example.answer == answer
        assert np.array_equal(example.target_mask, mask)
        assert example.answer in world.ANSWER_TO_ID
        kinds.add(example.question.split()[0:2][1])
        answers.add(example.answer)
    assert kinds == {"color", "shape", "there", "is"}
    assert answers == set(world.ANSWERS)


def test_captions_name_every_object_in_reading_order() -> None:
    scene = world.scene_for_seed(11)
    caption = world.make_caption(scene)
    ordered = sorted(scene.objects, key=lambda o: (o.row, o.col))
    assert caption == " and ".join(f"a {o.color} {o.shape}" for o in ordered)
    assert world.UNK_TOKEN not in world.tokenize(caption)


def test_tokenizer_round_trip_and_padding() -> None:
    text = "What color is the Circle?"
    tokens = world.tokenize(text)
    assert tokens == ["what", "color", "is", "the", "circle", "?"]
    ids = world.encode(text)
    assert ids[0] == world.CLS_ID and ids[-1] == world.SEP_ID
    assert world.tokenize(world.decode(ids)) == tokens
    assert world.tokenize("a purple blob") == ["a", world.UNK_TOKEN, world.UNK_TOKEN]
    ids_array, mask = world.encode_batch(["is there a red square?", "a"], max_length=10)
    assert ids_array.shape == (2, 10) and mask.sum(1).tolist() == [8, 3]
    assert (ids_array[~mask] == world.PAD_ID).all()
    with pytest.raises(ValueError):
        world.encode_batch(["a red circle and a blue square"], max_length=4)


def test_question_kinds_and_where_questions() -> None:
    kinds = {world.question_kind(world.vqa_example_for_seed(seed)[1].question) for seed in range(200)}
    assert kinds == set(world.QUESTION_KINDS)
    with pytest.raises(ValueError):
        world.question_kind("a red circle")
    rng = np.random.default_rng(5)
    for _ in range(20):
        scene = world.make_scene(rng)
        example = world.where_question(scene, rng)
        answer, mask = _expected(scene, example.question)
        assert example.answer == answer
        assert np.array_equal(example.target_mask, mask)
