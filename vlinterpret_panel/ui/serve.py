"""Serve the dashboard from Python (what ``vlinterpret serve`` runs)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import panel as pn

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.store import open_dataset


def check_port_free(address: str, port: int) -> None:
    """``VLIError`` (one line, suggesting ``--port``) when ``address:port`` cannot be listened on."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Tornado does: TIME_WAIT is no conflict
        try:
            probe.bind((address, port))
        except OSError as error:
            raise VLIError(
                f"cannot listen on {address}:{port} ({error.strerror or error}); choose another port with --port"
            ) from None


def serve(
    store: str | os.PathLike,
    *,
    address: str = "127.0.0.1",
    port: int = 5006,
    show: bool = False,
    model: str | None = None,
) -> None:
    """Serve the dashboard on ``store`` at ``address:port`` until interrupted (localhost by default).

    ``model``, an adapter spec of the store's model, adds "Add example" (loaded once, shared by sessions).
    """
    from vlinterpret_panel.ui.app import build_app

    ds = open_dataset(store)  # fail fast, with a readable message, before the server starts
    check_port_free(address, port)
    if model:
        from vlinterpret_panel.ui.add_example import live_model

        live_model(model).check_store(ds)
    origins = [f"{host}:{port}" for host in ("localhost", "127.0.0.1", address)]
    pn.serve(
        {"app": lambda: build_app(Path(store), model=model)},
        address=address,
        port=port,
        show=show,
        allow_websocket_origin=origins,
        title="vlinterpret-panel",
    )
