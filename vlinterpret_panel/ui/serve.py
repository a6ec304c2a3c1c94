"""Serve the dashboard from Python (what ``vlinterpret serve`` runs)."""

from __future__ import annotations

import os
from pathlib import Path

import panel as pn

from vlinterpret_panel.store import open_dataset


def serve(store: str | os.PathLike, *, address: str = "127.0.0.1", port: int = 5006, show: bool = False) -> None:
    """Serve the dashboard on ``store`` at ``address:port`` until interrupted (localhost by default)."""
    from vlinterpret_panel.ui.app import build_app

    open_dataset(store)  # fail fast, with a readable message, before the server starts
    origins = [f"{host}:{port}" for host in ("localhost", "127.0.0.1", address)]
    pn.serve(
        {"app": lambda: build_app(Path(store))},
        address=address,
        port=port,
        show=show,
        allow_websocket_origin=origins,
        title="vlinterpret-panel",
    )
