"""A synthetic scene world with ground truth, used to train and check the built-in models.

Every scene is drawn deterministically from a ``numpy.random.Generator``: a dark plain
background with 1-4 non-overlapping objects, each with a shape, a colour and a cell on a
coarse grid. Because we draw the pixels ourselves, we know exactly which pixels each object
covers, so every question comes with the mask of the pixels its answer depends on. That
mask is the ground truth against which attribution maps can be scored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (45, 190, 70),
    "blue": (50, 90, 235),
    "yellow": (230, 215, 50),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
BACKGROUND: tuple[int, int, int] = (18, 18, 26)

IMAGE_SIZE = 64
GRID_SIZE = 4
MAX_OBJECTS = 4
COLOR_JITTER = 12
HELDOUT_SEED_START = 1_000_000_000
"""Training uses per-example seeds below this value, evaluation uses seeds from it on."""

QUESTION_KINDS: tuple[str, ...] = ("color", "shape", "exists", "where")
"""Question kinds, named by ``question_kind``: what color / what shape / is there / where."""

ANSWERS: tuple[str, ...] = COLOR_NAMES + SHAPES + ("yes", "no") + QUADRANTS
ANSWER_TO_ID: dict[str, int] = {answer: index for index, answer in enumerate(ANSWERS)}

PAD_TOKEN = "[PAD]"
CLS_TOKEN = "[CLS]"
SEP_TOKEN = "[SEP]"
UNK_TOKEN = "[UNK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, CLS_TOKEN, SEP_TOKEN, UNK_TOKEN)
WORDS: tuple[str, ...] = (
    "what",
    "color",
    "shape",
    "is",
    "the",
    "object",
    "there",
    "a",
    "where",
    "and",
    "?",
    *SHAPES,
    *COLOR_NAMES,
)
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + WORDS
TOKEN_TO_ID: dict[str, int] = {token: index for index, token in enumerate(VOCAB)}
PAD_ID = TOKEN_TO_ID[PAD_TOKEN]
CLS_ID = TOKEN_TO_ID[CLS_TOKEN]
SEP_ID = TOKEN_TO_ID[SEP_TOKEN]
UNK_ID = TOKEN_TO_ID[UNK_TOKEN]

_TOKEN_PATTERN = re.compile(r"\[(?:pad|cls|sep|unk)\]|[a-z0-9]+|[^\sa-z0-9]")


@dataclass(frozen=True)
class SceneObject:
    """One object: what it is and where it sits (grid cell and pixel bounding box)."""

    shape: str
    color: str
    row: int
    col: int
    bbox: tuple[int, int, int, int]  # top, left, bottom (exclusive), right (exclusive)

    @property
    def quadrant(self) -> str:
        """The quadrant name answering "where is ...?" for this object."""
        vertical = "top" if self.row < GRID_SIZE // 2 else "bottom"
        horizontal = "left" if self.col < GRID_SIZE // 2 else "right"
        return f"{vertical} {horizontal}"


@dataclass
class Scene:
    """An RGB uint8 image ``[H, W, 3]``, its objects and one boolean mask ``[H, W]`` each."""

    image: np.ndarray
    objects: list[SceneObject]
    masks: list[np.ndarray]


class VQAExample(NamedTuple):
    """A question, its answer and the mask of the pixels the answer depends on."""

    question: str
    answer: str
    target_mask: np.ndarray


@cache
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` footprint of a shape filling its square box (cached, read-only)."""
    footprint = _shape_footprint(shape, size)
    footprint.setflags(write=False)
    return footprint


def _shape_footprint(shape: str, size: int) -> np.ndarray:
    coords = np.arange(size) + 0.5
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    if shape == "circle":
        radius = size / 2
        return (ys - radius) ** 2 + (xs - radius) ** 2 <= radius**2
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "triangle":
        half_width = ys / size * (size / 2)
        return np.abs(xs - size / 2) <= half_width
    raise ValueError(f"unknown shape {shape!r}; valid shapes: {', '.join(SHAPES)}")


def make_scene(
    rng: np.random.Generator,
    image_size: int = IMAGE_SIZE,
    num_objects: int | None = None,
) -> Scene:
    """Draw a scene with 1-4 objects, each a distinct (colour, shape) pair in its own grid cell.

    Distinct pairs keep questions like "is there a red circle?" tied to a single object.
    """
    cell = image_size // GRID_SIZE
    count = int(rng.integers(1, MAX_OBJECTS + 1)) if num_objects is None else num_objects
    pairs = [(color, shape) for color in COLOR_NAMES for shape in SHAPES]
    chosen_pairs = rng.choice(len(pairs), size=count, replace=False)
    cells = rng.choice(GRID_SIZE * GRID_SIZE, size=count, replace=False)
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    objects: list[SceneObject] = []
    masks: list[np.ndarray] = []
    for pair_index, cell_index in zip(chosen_pairs, cells, strict=True):
        color, shape = pairs[int(pair_index)]
        row, col = divmod(int(cell_index), GRID_SIZE)
        size = cell * 3 // 4
        top = row * cell + int(rng.integers(0, cell - size + 1))
        left = col * cell + int(rng.integers(0, cell - size + 1))
        mask = np.zeros((image_size, image_size), dtype=bool)
        mask[top : top + size, left : left + size] = shape_mask(shape, size)
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        rgb = np.clip(np.array(COLORS[color]) + jitter, 0, 255).astype(np.uint8)
        image[mask] = rgb
        objects.append(SceneObject(shape, color, row, col, (top, left, top + size, left + size)))
        masks.append(mask)
    return Scene(image=image, objects=objects, masks=masks)


def _empty_mask(scene: Scene) -> np.ndarray:
    return np.zeros(scene.image.shape[:2], dtype=bool)


def make_question(scene: Scene, rng: np.random.Generator) -> VQAExample:
    """Draw an unambiguous question about the scene, its answer and the target-object mask.

    Kinds: "what color is the <shape>?" and "what shape is the <color> object?" (only for a
    shape/colour that appears once), "is there a <color> <shape>?" (yes half the time; the
    target is the matching object, or an empty mask for "no"), and "where is the <color>
    <shape>?" (answer: quadrant name).
    """
    objects = scene.objects
    shape_counts = {shape: sum(o.shape == shape for o in objects) for shape in SHAPES}
    color_counts = {color: sum(o.color == color for o in objects) for color in COLOR_NAMES}
    unique_shape = [i for i, o in enumerate(objects) if shape_counts[o.shape] == 1]
    unique_color = [i for i, o in enumerate(objects) if color_counts[o.color] == 1]
    kinds = ["exists", "where"]
    if unique_shape:
        kinds.append("color")
    if unique_color:
        kinds.append("shape")
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "color":
        index = unique_shape[int(rng.integers(len(unique_shape)))]
        target = objects[index]
        return VQAExample(f"what color is the {target.shape}?", target.color, scene.masks[index].copy())
    if kind == "shape":
        index = unique_color[int(rng.integers(len(unique_color)))]
        target = objects[index]
        return VQAExample(f"what shape is the {target.color} object?", target.shape, scene.masks[index].copy())
    if kind == "where":
        return where_question(scene, rng)
    present = {(o.color, o.shape) for o in objects}
    if rng.random() < 0.5:
        index = int(rng.integers(len(objects)))
        target = objects[index]
        return VQAExample(f"is there a {target.color} {target.shape}?", "yes", scene.masks[index].copy())
    absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
    color, shape = absent[int(rng.integers(len(absent)))]
    return VQAExample(f"is there a {color} {shape}?", "no", _empty_mask(scene))


def where_question(scene: Scene, rng: np.random.Generator) -> VQAExample:
    """A "where is the <color> <shape>?" question about a random object of the scene."""
    index = int(rng.integers(len(scene.objects)))
    target = scene.objects[index]
    return VQAExample(f"where is the {target.color} {target.shape}?", target.quadrant, scene.masks[index].copy())


def question_kind(question: str) -> str:
    """The kind of a question drawn by ``make_question`` (one of ``QUESTION_KINDS``)."""
    words = tokenize(question)
    if words[:2] == ["what", "color"]:
        return "color"
    if words[:2] == ["what", "shape"]:
        return "shape"
    if words[:2] == ["is", "there"]:
        return "exists"
    if words[:1] == ["where"]:
        return "where"
    raise ValueError(f"not a question of the scene world: {question!r}")


def make_caption(scene: Scene) -> str:
    """Describe the objects in reading order (top to bottom, left to right)."""
    ordered = sorted(scene.objects, key=lambda o: (o.row, o.col))
    return " and ".join(f"a {o.color} {o.shape}" for o in ordered)


def caption_key(scene: Scene) -> frozenset[tuple[str, str]]:
    """The set of (colour, shape) pairs a caption mentions; equal keys are indistinguishable."""
    return frozenset((o.color, o.shape) for o in scene.objects)


def tokenize(text: str) -> list[str]:
    """Lowercase and split into words and punctuation; unknown words become ``[UNK]``."""
    tokens = [
        token.upper() if token.startswith("[") and len(token) > 1 else token
        for token in _TOKEN_PATTERN.findall(text.lower())
    ]
    return [token if token in TOKEN_TO_ID else UNK_TOKEN for token in tokens]


def encode(text: str) -> list[int]:
    """Token ids ``[CLS] words [SEP]`` for one text (no padding)."""
    return [CLS_ID] + [TOKEN_TO_ID[token] for token in tokenize(text)] + [SEP_ID]


def decode(ids: list[int] | np.ndarray) -> str:
    """Text for token ids, dropping special tokens; ``tokenize(decode(encode(t)))`` round-trips."""
    words = [VOCAB[int(i)] for i in ids if VOCAB[int(i)] not in (PAD_TOKEN, CLS_TOKEN, SEP_TOKEN)]
    return " ".join(words)


def encode_batch(texts: list[str], max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids ``[B, T]`` (int64) and a validity mask ``[B, T]`` (bool) for texts."""
    encoded = [encode(text) for text in texts]
    length = max(len(ids) for ids in encoded) if max_length is None else max_length
    if any(len(ids) > length for ids in encoded):
        raise ValueError(f"a text is longer than max_length={length} tokens")
    ids_array = np.full((len(texts), length), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(texts), length), dtype=bool)
    for row, ids in enumerate(encoded):
        ids_array[row, : len(ids)] = ids
        mask[row, : len(ids)] = True
    return ids_array, mask


def vqa_example_for_seed(seed: int) -> tuple[Scene, VQAExample]:
    """The scene and question drawn from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    scene = make_scene(rng)
    return scene, make_question(scene, rng)


def scene_for_seed(seed: int) -> Scene:
    """The scene drawn from ``numpy.random.default_rng(seed)`` (for captions and retrieval)."""
    return make_scene(np.random.default_rng(seed))


# The generative model's words: its own vocabulary, prompts, reference texts and their ground truth
# (its tokenizer is in ``models.generative``). ``VOCAB`` above stays as it is (the VQA and
# dual-encoder weights depend on its ids); the generative vocabulary extends it, so every word
# the two share has the same id in both.

BOS_TOKEN = "[BOS]"
EOS_TOKEN = "[EOS]"
DESCRIBE_PROMPT = "describe the scene"
GENERATIVE_TASKS: tuple[str, ...] = ("question", "describe")
"""What the generative model is asked: one of the world's questions, or ``DESCRIBE_PROMPT``."""
GENERATIVE_SPECIAL_TOKENS: tuple[str, ...] = (*SPECIAL_TOKENS, BOS_TOKEN, EOS_TOKEN)
GENERATIVE_VOCAB: tuple[str, ...] = (
    *VOCAB,
    BOS_TOKEN,
    EOS_TOKEN,
    "yes",
    "no",
    "describe",
    "scene",
    "at",
    "top",
    "bottom",
    "left",
    "right",
)
GENERATIVE_TOKEN_TO_ID: dict[str, int] = {token: index for index, token in enumerate(GENERATIVE_VOCAB)}


class GenerativeExample(NamedTuple):
    """What the generative model is asked about a scene and what it should say.

    ``task`` is ``"question"`` (``prompt`` one of the world's questions, ``reference`` its answer
    in words, ``target_mask`` the answer's object as ``VQAExample.target_mask``) or ``"describe"``
    (``prompt`` is ``DESCRIBE_PROMPT``, ``reference`` the scene's description, ``target_mask`` the
    union of all object masks).
    """

    task: str
    prompt: str
    reference: str
    target_mask: np.ndarray


def describe_scene(scene: Scene) -> str:
    """The reference description: objects in reading order, each "a <colour> <shape> at the <quadrant>".

    E.g. "a red square at the top right and a blue circle at the bottom left". Colour-shape
    pairs are unique per scene, so each phrase names exactly one object.
    """
    ordered = sorted(scene.objects, key=lambda o: (o.row, o.col))
    return " and ".join(f"a {o.color} {o.shape} at the {o.quadrant}" for o in ordered)


def generative_example_for_seed(seed: int, task: str = "question") -> tuple[Scene, GenerativeExample]:
    """The scene of ``seed`` with its question (exactly ``vqa_example_for_seed(seed)``'s) or the description prompt."""
    if task == "question":
        scene, vqa = vqa_example_for_seed(seed)
        return scene, GenerativeExample(task, vqa.question, vqa.answer, vqa.target_mask)
    if task == "describe":
        scene = scene_for_seed(seed)
        union = np.logical_or.reduce(scene.masks)
        return scene, GenerativeExample(task, DESCRIBE_PROMPT, describe_scene(scene), union)
    raise ValueError(f"unknown generative task {task!r}; valid tasks: {', '.join(GENERATIVE_TASKS)}")


def parse_description(text: str) -> list[tuple[str, str, str]] | None:
    """``(colour, shape, quadrant)`` of each "a <colour> <shape> at the <quadrant>" phrase joined by "and".

    None when the text is not exactly such a list (a missing, extra or misplaced word).
    """
    words = text.split()
    phrases: list[tuple[str, str, str]] = []
    position = 0
    while position < len(words):
        if phrases:
            if words[position] != "and":
                return None
            position += 1
        part = words[position : position + 7]
        position += 7
        if (
            len(part) < 7
            or part[0] != "a"
            or part[1] not in COLORS
            or part[2] not in SHAPES
            or part[3:5] != ["at", "the"]
            or " ".join(part[5:]) not in QUADRANTS
        ):
            return None
        phrases.append((part[1], part[2], " ".join(part[5:])))
    return phrases or None


def description_correct(scene: Scene, text: str) -> bool:
    """Whether a description names every object with its colour, shape and quadrant, and nothing else.

    The order of the phrases is not scored: the reference lists them in reading order, but a
    description in another order says the same.
    """
    phrases = parse_description(text)
    expected = sorted((o.color, o.shape, o.quadrant) for o in scene.objects)
    return phrases is not None and sorted(phrases) == expected


def answer_correct(reference: str, text: str) -> bool:
    """Exact match of a generated answer's words with the reference answer's (e.g. "top left")."""
    return text.split() == reference.split()


def generated_token_masks(scene: Scene, example: GenerativeExample, tokens: list[str]) -> list[np.ndarray | None]:
    """For each generated token string, the mask of the scene object it names, or None.

    Descriptions: in each "a <colour> <shape>" naming an object of the scene, the colour and
    shape words get that object's mask, and so do the two quadrant words of the "at the
    <quadrant>" that follows (they describe that object, right or wrong); "a", "at", "the",
    "and", special tokens and a colour-shape pair the scene does not hold get None.
    Answers: every answer word gets the question's target object (None where the answer
    names none, as "no" to "is there ...?"); special tokens get None.
    """
    masks: list[np.ndarray | None] = [None] * len(tokens)
    if example.task == "question":
        if example.target_mask.any():
            for index, token in enumerate(tokens):
                if token not in GENERATIVE_SPECIAL_TOKENS:
                    masks[index] = example.target_mask
        return masks
    by_pair = {(o.color, o.shape): mask for o, mask in zip(scene.objects, scene.masks, strict=True)}
    for start in range(len(tokens) - 2):
        mask = by_pair.get((tokens[start + 1], tokens[start + 2]))
        if tokens[start] != "a" or mask is None:
            continue
        masks[start + 1] = masks[start + 2] = mask
        place = tokens[start + 5 : start + 7]
        if tokens[start + 3 : start + 5] == ["at", "the"] and " ".join(place) in QUADRANTS:
            masks[start + 5] = masks[start + 6] = mask
    return masks
