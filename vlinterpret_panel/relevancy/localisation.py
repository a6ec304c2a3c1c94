"""Localisation of relevancy maps against ground-truth masks: the pointing game, on one map or a store.

Light on purpose (NumPy only): the dashboard ranks a store's stored methods with it to pick
the one to show first, without importing the evaluation's model code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from vlinterpret_panel.schema import IMAGE


def pointing_hit(values: np.ndarray, boxes: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the box of the most relevant token (``values`` and ``boxes`` of image tokens) covers a mask pixel."""
    top = int(np.argmax(values))
    x0, y0, x1, y1 = (round(float(v)) for v in boxes[top])
    return bool(mask[y0:y1, x0:x1].any())


def stored_pointing_game(ds: xr.Dataset, methods: Sequence[str], *, max_examples: int = 100) -> dict[str, float]:
    """Pointing-game accuracy of each stored relevancy method over up to ``max_examples`` examples with a mask.

    Examples whose ``target_mask`` is empty (e.g. "is there ...? no") are left out, as in the
    evaluation. Returns an empty dict when the store has no relevancy or no masks.
    """
    if "relevancy" not in ds or "target_mask" not in ds or not methods:
        return {}
    hits: dict[str, list[bool]] = {method: [] for method in methods}
    stored = [str(m) for m in ds.indexes["relevancy_method"]]
    columns = [stored.index(method) for method in methods]
    names = ["relevancy", "target_mask", "token_box", "modality", "image_height", "image_width"]
    for start in range(0, ds.sizes["example"], max_examples):
        block = ds[names].isel(example=slice(start, start + max_examples)).compute()  # one read per shard
        for one in (block.isel(example=i) for i in range(block.sizes["example"])):
            mask = one["target_mask"].values[: int(one["image_height"]), : int(one["image_width"])] > 0
            image = np.flatnonzero(one["modality"].values == IMAGE)
            boxes = one["token_box"].values[image]
            usable = np.isfinite(boxes).all(axis=1)
            if not mask.any() or not usable.any():
                continue
            for method, column in zip(methods, columns, strict=True):
                values = one["relevancy"].values[column, image[usable]]
                if np.isfinite(values).any():
                    hits[method].append(pointing_hit(np.nan_to_num(values, nan=-np.inf), boxes[usable], mask))
            if len(hits[methods[0]]) >= max_examples:
                return {method: float(np.mean(found)) for method, found in hits.items() if found}
    return {method: float(np.mean(found)) for method, found in hits.items() if found}
