"""The dashboard: ``panel serve dashboards/app.py`` (shipped demo) or ``... --args STORE``."""

import sys
from pathlib import Path

from vlinterpret_panel.ui.app import build_app

DEMO_STORE = Path(__file__).resolve().parent.parent / "datasets" / "synthetic"

store = Path(sys.argv[1]) if len(sys.argv) > 1 else DEMO_STORE
build_app(store).servable()
