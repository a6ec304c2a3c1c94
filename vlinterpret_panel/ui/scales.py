"""Colour scales every map shares: an explicit range, a readable colorbar, and an overlay that keeps the image.

A researcher reads magnitudes off the colour, so no view autoscales silently:

* ``MapScale``: ``fixed`` [0, 1] (attention rows are shares of 1), ``per map`` (0 to this
  map's maximum) or ``shared`` (0 to the maximum over the maps shown together, e.g. the
  heads of a comparison). The colorbar's label states the range's top, and a map that is
  all zero says so instead of drawing a colorbar.
* Overlays on the image use ``overlay_palette``: colorcet's ``fire`` from red through orange to
  bright yellow (bright over the dark scenes; its white end turned a red object pink) with an
  opacity that grows from 0 at the bottom of the scale to ``opacity`` (0.7 by default) at its
  top, as the 1.5th power of the value's share of the top. Low values leave the image as it
  is (no darkening), the hottest patch is the most opaque and brightest thing on it.
  Bokeh takes the alpha from the palette, so the colorbar shows exactly what is painted.
* A map with negative values (AttnLRP's relevancy: negative speaks against the answer) is
  ``signed``: its range is symmetric, ``-top`` to ``top`` with ``top`` the largest magnitude,
  and it is painted with a diverging palette, blue (negative) through transparent (0) to red
  (positive), so neither sign is hidden under the bottom of a one-sided scale.
* Tick labels use at most three significant digits (``%.3g``): Bokeh's default wrote
  ``5.000e-5``, which its colorbar then clipped to ``5.000e``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import colorcet
import numpy as np

ScaleName = Literal["per map", "fixed", "shared"]
SCALES: tuple[str, ...] = ("per map", "fixed", "shared")
SCALE_HELP = {
    "per map": "0 to the largest value of this map",
    "fixed": "0 to 1 (attention rows are shares of 1)",
    "shared": "0 to the largest value of the maps shown together",
}
DEFAULT_OPACITY = 0.7
ALPHA_GAMMA = 1.5
"""Opacity grows as (value / top) ** 1.5: half the top is a third as opaque, so the top stands out of a diffuse map."""
_OVERLAY_COLORS = colorcet.fire[128:232]  # red to bright yellow, not white: white washed objects out to pink
_SIGNED_COLORS = colorcet.coolwarm  # blue, grey at 0, red
SIGNED_TEXT_PALETTE = colorcet.coolwarm
_PALETTE_SIZE = 128


TICK_FORMAT = "%.3g"


def colorbar_options() -> dict:
    """HoloViews options of a readable colorbar: tick labels with at most three significant digits.

    Call it for every element: HoloViews writes the formatter it makes into the ``colorbar_opts``
    dict it is given, so a dict shared by several plots (e.g. in ``hv.opts.defaults``) hands one
    Bokeh formatter to plots of several sessions (documents), whose colorbars then lost their
    tick labels or all read "0".
    """
    return {"colorbar": True, "cformatter": TICK_FORMAT, "colorbar_opts": {}}


def overlay_palette(opacity: float = DEFAULT_OPACITY) -> list[str]:
    """``#rrggbbaa`` colours from transparent (bottom of the scale) to opaque ``opacity`` (top)."""
    positions = np.linspace(0, 1, _PALETTE_SIZE)
    colors = [_OVERLAY_COLORS[round(float(p) * (len(_OVERLAY_COLORS) - 1))] for p in positions]
    alphas = np.clip(positions**ALPHA_GAMMA * opacity, 0, 1)
    return [f"{color}{round(alpha * 255):02x}" for color, alpha in zip(colors, alphas, strict=True)]


def signed_overlay_palette(opacity: float = DEFAULT_OPACITY) -> list[str]:
    """``#rrggbbaa`` colours from opaque blue (bottom) through transparent (middle, 0) to opaque red (top)."""
    positions = np.linspace(-1, 1, _PALETTE_SIZE + 1)
    colors = [_SIGNED_COLORS[round((float(p) + 1) / 2 * (len(_SIGNED_COLORS) - 1))] for p in positions]
    alphas = np.clip(np.abs(positions) ** ALPHA_GAMMA * opacity, 0, 1)
    return [f"{color}{round(alpha * 255):02x}" for color, alpha in zip(colors, alphas, strict=True)]


def _finite(values: np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return array[np.isfinite(array)]


def finite_max(values: np.ndarray) -> float:
    """The largest finite value (0 when there is none)."""
    finite = _finite(values)
    return float(finite.max()) if finite.size else 0.0


def finite_magnitude(values: np.ndarray) -> float:
    """The largest finite absolute value (0 when there is none)."""
    finite = _finite(values)
    return float(np.abs(finite).max()) if finite.size else 0.0


def has_negative(values: np.ndarray) -> bool:
    """Whether any finite value is below 0 (the map is signed)."""
    finite = _finite(values)
    return bool(finite.size and finite.min() < 0)


@dataclass(frozen=True)
class MapScale:
    """The colour range of one map: ``(0, top)`` (``signed``: ``(-top, top)``), how it was chosen, and whether
    the map is all zero."""

    top: float
    scale: str
    all_zero: bool
    signed: bool = False

    @property
    def clim(self) -> tuple[float, float]:
        return (-self.top if self.signed else 0.0, self.top)

    def label(self, quantity: str) -> str:
        """The colorbar's label: the quantity and the range, with how it was chosen."""
        if self.signed:
            return f"{quantity} (±{self.top:.3g}, {self.scale})"
        return f"{quantity} (0 to {self.top:.3g}, {self.scale})"

    def overlay_palette(self, opacity: float) -> list[str]:
        """The palette of this map laid over an image: one-sided, or diverging when signed."""
        return signed_overlay_palette(opacity) if self.signed else overlay_palette(opacity)

    def options(self, quantity: str) -> dict[str, Any]:
        """HoloViews options: the range, and a labelled readable colorbar unless the map is all zero.

        The label is set by a hook on every frame: HoloViews gives a DynamicMap's colorbar the
        title of its first frame only, so a stale range would be shown after a click.
        """
        if self.all_zero:
            return {"clim": (0.0, 1.0), "colorbar": False, "hooks": []}
        label = self.label(quantity)
        return {"clim": self.clim, "clabel": label, "hooks": [partial(title_colorbar, label)], **colorbar_options()}


def title_colorbar(title: str, plot: Any, element: Any) -> None:
    """HoloViews hook: set the plot's colorbar title (each frame; a colour ``dim``'s bar is ``color_colorbar``)."""
    for name, handle in plot.handles.items():
        if name.endswith("colorbar"):
            handle.title = title


def map_scale(values: np.ndarray, scale: str = "per map", shared_with: Iterable[np.ndarray] = ()) -> MapScale:
    """The colour range of ``values`` under ``scale`` (``shared``: the maximum over ``shared_with`` too).

    A map with a negative value is ``signed``: the range is symmetric around 0 and ``fixed`` is [-1, 1].
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, not {scale!r}")
    signed = has_negative(values)
    largest = finite_magnitude if signed else finite_max
    own = largest(values)
    all_zero = own <= 0
    if scale == "fixed":
        return MapScale(1.0, "fixed", all_zero, signed)
    top = max([own, *(largest(other) for other in shared_with)]) if scale == "shared" else own
    return MapScale(top if top > 0 else 1.0, scale, all_zero, signed)
