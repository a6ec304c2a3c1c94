"""Counterfactual edits: mask a region of an example's image and/or change its text, and compare.

An ``Edit`` names what changes: a box and/or brush strokes to mask (filled with the image's
background colour, a blur of the image, or its mean colour) and an optional new question.
``LiveModel.add_counterfactual`` runs the model on the edited input and stores the result as a
new example whose ``counterfactual_of`` names the original and ``counterfactual_edit`` holds
the edit (``Edit.to_json``). ``compare`` and ``image_map`` read an original and its edit back
for a side-by-side view; nothing here runs a model or draws.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import xarray as xr

from vlinterpret_panel import answers
from vlinterpret_panel.errors import VLIError

Fill = Literal["background", "blur", "mean"]
FILLS: tuple[Fill, ...] = ("background", "blur", "mean")
MAX_STROKES = 32
MAX_STROKE_POINTS = 2000


@dataclass(frozen=True)
class Edit:
    """What a counterfactual changes in its original.

    ``box`` is ``(x0, y0, x1, y1)`` in image pixels (x to the right, y down, x1/y1 exclusive);
    ``strokes`` are brush paths, each a sequence of ``(x, y)`` pixel points, painted
    ``brush_width`` pixels wide; ``question`` replaces the text when not None.
    """

    box: tuple[int, int, int, int] | None = None
    strokes: tuple[tuple[tuple[float, float], ...], ...] = field(default_factory=tuple)
    brush_width: float = 8.0
    fill: Fill = "background"
    question: str | None = None

    def check(self) -> None:
        """``VLIError`` for an edit that changes nothing or names an unknown fill."""
        if self.fill not in FILLS:
            raise VLIError(f"unknown fill {self.fill!r}; use {', '.join(FILLS)}")
        if self.box is None and not self.strokes and self.question is None:
            raise VLIError("the edit changes nothing: draw a box or a brush stroke on the image, or edit the question")
        if len(self.strokes) > MAX_STROKES or any(len(s) > MAX_STROKE_POINTS for s in self.strokes):
            raise VLIError(f"too many brush strokes (at most {MAX_STROKES} of {MAX_STROKE_POINTS} points)")
        if self.brush_width <= 0:
            raise VLIError(f"the brush width must be positive, not {self.brush_width}")

    @property
    def masks(self) -> bool:
        """Whether the edit masks part of the image."""
        return self.box is not None or bool(self.strokes)

    def region(self, height: int, width: int) -> np.ndarray:
        """The masked pixels, ``[height, width]`` booleans."""
        rows, cols = np.mgrid[0:height, 0:width]
        inside = np.zeros((height, width), dtype=bool)
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            inside[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
        centres_x, centres_y = cols + 0.5, rows + 0.5
        radius2 = (self.brush_width / 2) ** 2
        for stroke in self.strokes:
            points = np.asarray(stroke, dtype=np.float64).reshape(-1, 2)
            segments = itertools.pairwise(points) if len(points) > 1 else [(points[0], points[0])]
            for start, end in segments:
                direction = end - start
                length2 = float(direction @ direction)
                if length2 == 0:
                    t = np.zeros_like(centres_x)
                else:
                    t = ((centres_x - start[0]) * direction[0] + (centres_y - start[1]) * direction[1]) / length2
                    t = np.clip(t, 0, 1)
                dx = centres_x - (start[0] + t * direction[0])
                dy = centres_y - (start[1] + t * direction[1])
                inside |= dx * dx + dy * dy <= radius2
        return inside

    def apply(self, image: np.ndarray) -> np.ndarray:
        """``image`` (uint8 H×W×3) with the region filled; a new array, the input untouched."""
        edited = np.array(image, dtype=np.uint8, copy=True)
        if not self.masks:
            return edited
        region = self.region(*edited.shape[:2])
        edited[region] = fill_pixels(image, self.fill)[region]
        return edited

    def text(self, original: str) -> str:
        """The edited example's text."""
        return original if self.question is None else self.question

    def describe(self) -> str:
        """One line naming the edit, for lists and titles."""
        parts = []
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            parts.append(f"box x {x0}-{x1}, y {y0}-{y1}")
        if self.strokes:
            parts.append(f"{len(self.strokes)} brush stroke{'s' * (len(self.strokes) > 1)}")
        if self.masks:
            parts[-1] += f" filled with {self.fill}"
        if self.question is not None:
            parts.append(f"question {self.question!r}")
        return "; ".join(parts)

    def to_json(self) -> str:
        """The edit as the JSON stored in ``counterfactual_edit``."""
        return json.dumps(
            {
                "box": list(self.box) if self.box is not None else None,
                "strokes": [[list(map(float, p)) for p in s] for s in self.strokes],
                "brush_width": self.brush_width,
                "fill": self.fill,
                "question": self.question,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Edit:
        """The edit stored as ``to_json``; ``VLIError`` for anything else."""
        try:
            data = json.loads(text)
            box = data.get("box")
            return cls(
                box=tuple(int(v) for v in box) if box is not None else None,  # type: ignore[arg-type]
                strokes=tuple(tuple((float(x), float(y)) for x, y in s) for s in data.get("strokes", [])),
                brush_width=float(data.get("brush_width", 8.0)),
                fill=data.get("fill", "background"),
                question=data.get("question"),
            )
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as error:
            raise VLIError(f"not a counterfactual edit: {error}") from None


def fill_pixels(image: np.ndarray, fill: Fill) -> np.ndarray:
    """What a masked pixel becomes, for every pixel: the background colour, a blur, or the mean colour.

    The background colour is the most common colour of the image's border (the scene's
    backdrop on a plain background, a frame-coloured guess on a photograph); the blur is a
    Gaussian of a twelfth of the shorter side, at least 2 pixels.
    """
    height, width = image.shape[:2]
    if fill == "mean":
        colour = image.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
        return np.broadcast_to(colour, image.shape)
    if fill == "background":
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        colours, counts = np.unique(border.reshape(-1, 3), axis=0, return_counts=True)
        return np.broadcast_to(colours[counts.argmax()].astype(np.uint8), image.shape)
    if fill == "blur":
        from PIL import Image, ImageFilter

        radius = max(2.0, min(height, width) / 12)
        blurred = Image.fromarray(np.ascontiguousarray(image)).filter(ImageFilter.GaussianBlur(radius))
        return np.asarray(blurred, dtype=np.uint8)
    raise VLIError(f"unknown fill {fill!r}; use {', '.join(FILLS)}")


# Reading originals and their counterfactuals back


def origins(ds: xr.Dataset) -> pd.Series:
    """Per example id, the id of the example it was edited from ("" for originals)."""
    ids = [str(i) for i in ds.indexes["example"]]
    if "counterfactual_of" not in ds:
        return pd.Series("", index=ids, dtype=object)
    return pd.Series([str(v) for v in ds["counterfactual_of"].values], index=ids, dtype=object)


def edit_of(ds: xr.Dataset, example: str) -> Edit | None:
    """The edit that made ``example``, or None for an original."""
    if "counterfactual_edit" not in ds:
        return None
    text = str(ds["counterfactual_edit"].sel(example=example).values)
    return Edit.from_json(text) if text else None


def outcome(ds: xr.Dataset, example: str) -> pd.DataFrame:
    """What the model produced for ``example``: per generated token (step, token, probability), or its prediction.

    A store without generated answers gives one row: step 0, the prediction (or "" for a model
    that only scores, like a dual encoder) and its score.
    """
    if answers.has_answers(ds):
        table = ds.vli.answer(example)
        return table[["step", "token", "probability"]].reset_index(drop=True)
    position = ds.vli.position(example)
    prediction = str(ds["prediction"].values[position]) if "prediction" in ds else ""
    score = float(ds["score"].values[position]) if "score" in ds else float("nan")
    return pd.DataFrame({"step": [0], "token": [prediction], "probability": [score]})


def compare(ds: xr.Dataset, original: str, edited: str) -> pd.DataFrame:
    """The two outcomes step by step: token and probability of each, and the probability's change."""
    before = outcome(ds, original).set_index("step")
    after = outcome(ds, edited).set_index("step")
    table = before.add_suffix("_original").join(after.add_suffix("_edited"), how="outer")
    table["change"] = table["probability_edited"] - table["probability_original"]
    table[["token_original", "token_edited"]] = table[["token_original", "token_edited"]].fillna("")
    return table.reset_index()


def image_map(ds: xr.Dataset, example: str, method: str, step: int = 0) -> np.ndarray:
    """``example``'s map (``answers.output_map``) over its image pixels ``[height, width]``, 0 off the patches."""
    values = answers.output_map(ds, example, method, step)
    return np.nan_to_num(np.asarray(ds.vli.values_on_image(example, values), dtype=np.float64))
