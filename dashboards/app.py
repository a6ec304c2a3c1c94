"""The dashboard: ``panel serve dashboards/app.py`` (shipped demo) or ``... --args STORE [--model SPEC]``."""

import argparse
import sys
from pathlib import Path

import panel as pn

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.ui.app import build_app

DEMO_STORE = Path(__file__).resolve().parent.parent / "datasets" / "single_stream"

parser = argparse.ArgumentParser(prog="panel serve dashboards/app.py --args")
parser.add_argument("store", nargs="?", type=Path, default=DEMO_STORE)
parser.add_argument("--model", help="adapter spec of the store's model: adds 'Add example'")
args = parser.parse_args(sys.argv[1:])
try:
    build_app(args.store, model=args.model).servable()
except VLIError as error:  # a bad store path or file: say so on the page, no traceback
    pn.pane.Alert(f"Cannot open the store: {error}", alert_type="danger").servable()
