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
