"""The dashboard: ``panel serve dashboards/app.py`` (shipped demo) or ``... --args STORE``."""

import sys
from pathlib import Path

import panel as pn

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.ui.app import build_app

DEMO_STORE = Path(__file__).resolve().parent.parent / "datasets" / "synthetic"

store = Path(sys.argv[1]) if len(sys.argv) > 1 else DEMO_STORE
try:
    build_app(store).servable()
except VLIError as error:  # a bad store path or file: say so on the page, no traceback
    pn.pane.Alert(f"Cannot open the store: {error}", alert_type="danger").servable()
