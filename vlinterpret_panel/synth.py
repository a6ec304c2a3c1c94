"""Synthetic stores of any size, with plausible attention, for tests and benchmarks.

Like VL-InterpreT's random example database, but scalable and valid under the schema:
softmax attention rows with per-head biases between modality blocks, local image heads,
[CLS]/[SEP] sinks, hidden states that drift across layers, and images with shapes.
Every example is generated from ``(seed, index)`` alone, so the values do not depend on
how the examples are split into shards.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vlinterpret_panel.schema import IMAGE, SPECIAL, TEXT, ExampleRecord, ModelInfo
from vlinterpret_panel.store import Precision, write_records

WORDS = (
    "what color is the circle square triangle left right of a red blue green yellow "
    "there how many shapes are in image big small top bottom near far"
).split()
ANSWERS = ("yes", "no", "red", "blue", "green", "yellow", "one", "two", "three")


@dataclass(frozen=True)
class SynthSpec:
    """Sizes of a synthetic store."""

    examples: int = 16
    layers: int = 4
    heads: int = 4
    tokens: int = 40
    hidden_size: int = 32
    image_size: int = 64
    vary_length: bool = True
    seed: int = 0

    @property
    def grid(self) -> int:
        """Patch grid side: image tokens take about three quarters of the sequence."""
        return max(1, math.isqrt(max(1, int(0.75 * (self.tokens - 3)))))

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            name="synthetic",
            layer_kind=["self"] * self.layers,
            num_heads=[self.heads] * self.layers,
            hidden_layer_name=["embeddings"] + [f"layer.{i}" for i in range(self.layers)],
            layer_name=[f"encoder.layer.{i}.attention" for i in range(self.layers)],
            config={"generator": "vlinterpret_panel.synth", **self.__dict__},
        )


def _image(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A gradient background with a few coloured rectangles; the first one is the target."""
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    base = rng.uniform(20, 80, size=3)
    image = base + 60 * y * rng.uniform(0, 1, 3) + 60 * x * rng.uniform(0, 1, 3)
    image = np.broadcast_to(image, (height, width, 3)).copy()
    target = np.zeros((height, width), dtype=bool)
    for shape_index in range(rng.integers(1, 4)):
        h, w = rng.integers(height // 6 + 1, height // 2 + 2), rng.integers(width // 6 + 1, width // 2 + 2)
        top, left = rng.integers(0, max(1, height - int(h))), rng.integers(0, max(1, width - int(w)))
        image[top : top + h, left : left + w] = rng.uniform(120, 255, 3)
        if shape_index == 0:
            target[top : top + h, left : left + w] = True
    return image.clip(0, 255).astype(np.uint8), target


def _attention(
    rng: np.random.Generator, spec: SynthSpec, modality: np.ndarray, patch_position: np.ndarray
) -> np.ndarray:
    """Softmax rows with modality-block biases, local image heads and special-token sinks."""
    n_tokens = len(modality)
    codes = np.select([modality == TEXT, modality == IMAGE], [0, 1], 2)
    head_rng = np.random.default_rng([spec.seed, 7])  # head character is shared by all examples
    block_bias = head_rng.normal(0, 1.5, size=(spec.layers, spec.heads, 3, 3))
    locality = head_rng.uniform(0, 1.5, size=(spec.layers, spec.heads, 1, 1))
    logits = block_bias[:, :, codes[:, None], codes[None, :]]
    is_patch = patch_position[:, 0] >= 0
    distance = np.linalg.norm(patch_position[:, None, :] - patch_position[None, :, :], axis=-1)
    logits = logits - locality * np.where(is_patch[:, None] & is_patch[None, :], distance, 0.0)
    logits = logits + 2.0 * np.eye(n_tokens) + rng.normal(0, 1.0, size=logits.shape)
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)


def synthetic_record(spec: SynthSpec, index: int) -> ExampleRecord:
    """Example ``index`` of the synthetic store described by ``spec``."""
    rng = np.random.default_rng([spec.seed, index])
    grid = spec.grid
    n_text = max(1, spec.tokens - 2 - grid * grid)
    if spec.vary_length:
        n_text = max(1, n_text - int(rng.integers(0, n_text // 2 + 1)))
    words = [str(w) for w in rng.choice(WORDS, size=n_text)]
    height = spec.image_size - (int(rng.integers(0, spec.image_size // 4 + 1)) if spec.vary_length else 0)
    width = spec.image_size
    image, target = _image(rng, height, width)

    tokens = ["[CLS]", *words, "[SEP]"] + [f"patch_{r}_{c}" for r in range(grid) for c in range(grid)]
    modality = np.array([SPECIAL] + [TEXT] * n_text + [SPECIAL] + [IMAGE] * grid * grid)
    boxes = np.full((len(tokens), 4), np.nan, dtype=np.float32)
    patch_position = np.full((len(tokens), 2), -1, dtype=np.int16)
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    first_patch = n_text + 2
    patch_position[first_patch:] = np.stack([rows, cols], axis=1)
    boxes[first_patch:] = np.stack(
        [cols * width / grid, rows * height / grid, (cols + 1) * width / grid, (rows + 1) * height / grid],
        axis=1,
    )
    attention = _attention(rng, spec, modality, patch_position)

    embedding = rng.normal(0, 1, size=(len(tokens), spec.hidden_size))
    embedding[modality == IMAGE] += 1.5
    drift = rng.normal(0, 0.5, size=(spec.layers, len(tokens), spec.hidden_size))
    hidden_states = np.concatenate([embedding[None], embedding[None] + np.cumsum(drift, axis=0)])

    label = str(rng.choice(ANSWERS))
    prediction = label if rng.uniform() < 0.7 else str(rng.choice(ANSWERS))
    return ExampleRecord(
        example_id=f"synth-{index:07d}",
        image=image,
        text=" ".join(words) + "?",
        tokens=tokens,
        modality=modality.tolist(),
        token_box=boxes,
        attention=attention,
        hidden_states=hidden_states.astype(np.float32),
        label=label,
        prediction=prediction,
        score=float(rng.uniform(0.3, 1.0)),
        readout_tokens={"answer": 0},
        patch_position=patch_position,
        target_mask=target,
    )


def synthetic_records(spec: SynthSpec, start: int = 0, stop: int | None = None) -> Iterator[ExampleRecord]:
    """Examples ``start`` to ``stop`` (default: all) of the store ``spec`` describes."""
    for index in range(start, spec.examples if stop is None else stop):
        yield synthetic_record(spec, index)


def write_synthetic_store(
    path: str | os.PathLike,
    spec: SynthSpec,
    *,
    examples_per_shard: int = 8,
    precision: Precision = "float16",
    progress: bool = False,
) -> list[Path]:
    """Write the store described by ``spec`` to ``path``; return the new shard paths."""
    info = spec.model_info()
    shards = []
    with tqdm(total=spec.examples, unit="example", disable=not progress) as bar:
        for start in range(0, spec.examples, examples_per_shard):
            stop = min(spec.examples, start + examples_per_shard)
            records = list(synthetic_records(spec, start, stop))
            shards.append(write_records(records, info, path, precision=precision, extraction={"synthetic": True}))
            bar.update(stop - start)
    return shards
