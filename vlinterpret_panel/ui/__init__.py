"""The dashboard: one Panel ``Viewer`` per view, composed in ``app.py``.

``from vlinterpret_panel.ui import Dashboard`` then ``Dashboard(ds)`` renders inline in JupyterLab;
each view (``HeadSummary(ds, selection)``, ...) also works alone with a ``Selection.for_dataset(ds)``.
Imported lazily: loading HoloViews' plotting backend takes seconds.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Dashboard": "vlinterpret_panel.ui.dashboard",
    "build_app": "vlinterpret_panel.ui.app",
    "Selection": "vlinterpret_panel.ui.selection",
    "ExampleBrowser": "vlinterpret_panel.ui.examples",
    "HeadSummary": "vlinterpret_panel.ui.head_summary",
    "AttentionHeatmap": "vlinterpret_panel.ui.attention",
    "ImageView": "vlinterpret_panel.ui.image",
    "TextView": "vlinterpret_panel.ui.text",
    "EmbeddingView": "vlinterpret_panel.ui.embedding",
    "RelevancyView": "vlinterpret_panel.ui.relevancy",
    "HeadComparison": "vlinterpret_panel.ui.compare",
    "TokenControls": "vlinterpret_panel.ui.tokens",
    "ExportPanel": "vlinterpret_panel.ui.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlinterpret_panel.ui' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
