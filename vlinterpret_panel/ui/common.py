"""What all views share: plot defaults set once, and the way a user error reaches the page."""

from __future__ import annotations

import functools
import html
import sys
from collections.abc import Callable
from typing import TypeVar

import holoviews as hv
import panel as pn
import param
from bokeh.core.validation import silence
from bokeh.core.validation.warnings import FIXED_SIZING_MODE

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.ui.selection import Selection

_Element = TypeVar("_Element")

ATTENTION_CMAP = "inferno"
SELECTED_COLOR = "#00e5ff"
# Frame sizes chosen so the Attention tab (head summary, image, attention matrix, text) fits one
# 1600 x 1000 screen beside the sidebar, and wraps into two rows at 1280 x 800.
SUMMARY_SIZE = 200
IMAGE_SIZE = 240
MATRIX_SIZE = 230
SIDEBAR_WIDTH = 280
SIDEBAR_CONTROL_WIDTH = 245
"""Widest fixed-width control in the sidebar: with its margins it fits the sidebar's 265 px of content (Panel's
default width, 300 px, widened the sidebar's column under its edge and cut every stretched control there)."""
TITLE_PIXELS_PER_CHARACTER = 8.5
# Every tap goes through HoloViews' Tap stream (Bokeh's plot-level tap event). No plot has Bokeh's
# tap *tool*: it would select the tapped glyph and fade all others, which hides the data.
NO_SELECTION_FADE = {"nonselection_alpha": 1.0, "selection_alpha": 1.0}
# The page template styles headings one way when it is first rendered and another when its
# design is re-applied to rebuilt objects (after "add example": 14 px bold became 28 px
# regular); an own stylesheet, applied last either way, pins the first look.
_HEADING_CSS = """
:host h3, :host h4 { font-weight: 700; margin: 0.5em 0; line-height: 1.43; }
:host h3 { font-size: 1.17em; }
:host h4 { font-size: 1em; }
"""


def in_jupyter() -> bool:
    """Whether this process is a Jupyter kernel: its notebooks get BokehJS and Panel's scripts inline.

    By default a notebook loads them from cdn.bokeh.org and cdn.holoviz.org, so offline the
    dashboard drew nothing; a served app gets them from the server itself either way.
    """
    return "ipykernel" in sys.modules


def next_tick(callback: Callable[[], None]) -> None:
    """Run ``callback`` on the served page's next tick (after this change has been sent), else now.

    Outside a server session (a notebook, a test) there is no next tick to wait for."""
    document = pn.state.curdoc
    if document is not None and document.session_context is not None:
        document.add_next_tick_callback(callback)
    else:
        callback()


def extension() -> None:
    """Panel's extension as the dashboard needs it (no notifications; resources inline in a notebook)."""
    ensure_extension()
    pn.extension(notifications=False, inline=in_jupyter())


def ensure_extension() -> None:
    """Load HoloViews' Bokeh backend once and set the plot defaults every view uses.

    Bokeh's W-1005 (FIXED_SIZING_MODE) is silenced: it flags every plot sized by its frame
    (``frame_width``/``frame_height``, how every view sizes its plots) as having no width,
    four times per page load, though the frame fixes the size.
    """
    silence(FIXED_SIZING_MODE, True)
    if hv.Store.current_backend != "bokeh" or "bokeh" not in hv.Store.renderers:
        hv.extension("bokeh", logo=False, inline=in_jupyter())
    # Toolbars sit right of the plots: above them, they covered the titles.
    hv.opts.defaults(
        hv.opts.Image(cmap=ATTENTION_CMAP, tools=["hover"], toolbar="right", colorbar=True),
        hv.opts.HeatMap(cmap=ATTENTION_CMAP, tools=["hover"], toolbar="right", colorbar=True),
        hv.opts.RGB(toolbar="right"),
        hv.opts.Points(toolbar="right", **NO_SELECTION_FADE),
        hv.opts.Rectangles(toolbar="right", **NO_SELECTION_FADE),
    )


def checkbox(owner: param.Parameterized, name: str, label: str) -> pn.widgets.CheckBoxGroup:
    """A checkbox for the Boolean param ``owner.name`` whose label text toggles it too.

    Bokeh's ``Checkbox`` draws its label beside the input, outside any ``<label>`` element, so a
    click on the text did nothing; a one-option ``CheckBoxGroup`` wraps both in a ``<label>``.
    """
    box = pn.widgets.CheckBoxGroup(options=[label], value=[label] if getattr(owner, name) else [], inline=True)
    box.param.watch(lambda event: setattr(owner, name, label in event.new), "value")
    owner.param.watch(lambda event: setattr(box, "value", [label] if event.new else []), name)
    return box


def fit_title(text: str, width: int) -> str:
    """``text`` shortened with an ellipsis to what a plot ``width`` pixels wide shows on one line."""
    limit = max(8, int(width / TITLE_PIXELS_PER_CHARACTER))
    return text if len(text) <= limit else text[: limit - 1] + "…"


_CARD_TITLE_CSS = ":host h3 { font-weight: 700; line-height: 1.43; }"


def heading(text: str, level: int = 3) -> pn.pane.Markdown:
    """A section heading that looks the same on the first page and in views rebuilt later."""
    return pn.pane.Markdown(f"{'#' * level} {text}", stylesheets=[_HEADING_CSS])


def card_title(text: str) -> pn.pane.HTML:
    """A ``pn.Card`` header (its ``header=``) that keeps its first look in rebuilt views, like ``heading``."""
    return pn.pane.HTML(
        f"<h3>{html.escape(text)}</h3>", css_classes=["card-title"], stylesheets=[_CARD_TITLE_CSS], margin=(5, 0)
    )


def dynamic_map(callback: Callable, streams: list) -> hv.DynamicMap:
    """A DynamicMap driven by ``streams`` that keeps only its latest frame.

    HoloViews keeps 500 frames by default: with a new image and matrix per click that grew the
    server by half a gigabyte in the benchmark. Data worth keeping is cached in ``maps``.
    """
    return hv.DynamicMap(callback, streams=streams, cache_size=1)


def guarded(selection: Selection, fallback: Callable[[str], _Element]) -> Callable:
    """Wrap a plot callback so a ``VLIError`` shows as the selection's message, not a traceback."""

    def decorate(callback: Callable[..., _Element]) -> Callable[..., _Element]:
        @functools.wraps(callback)
        def wrapper(*args, **kwargs) -> _Element:
            try:
                return callback(*args, **kwargs)
            except (VLIError, ImportError) as error:  # a user error, or an analysis module not installed
                selection.message = str(error)
                return fallback(str(error))

        return wrapper

    return decorate


def message_banner(selection: Selection) -> pn.viewable.Viewable:
    """An alert showing the selection's last user error; hidden when there is none."""
    alert = pn.pane.Alert("", alert_type="warning", visible=False, sizing_mode="stretch_width")

    def show(event: object = None) -> None:
        alert.object = selection.message
        alert.visible = bool(selection.message)

    selection.param.watch(show, "message")
    show()
    return alert
