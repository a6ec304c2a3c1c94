"""Serve the dashboard from Python (what ``vlinterpret serve`` runs)."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.store import open_dataset

# Errors of binding a listening socket that the user fixes with another --port or --address.
_BIND_ERRORS = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)


def _cannot_listen(address: str, port: int, error: OSError) -> VLIError:
    return VLIError(f"cannot listen on {address}:{port} ({error.strerror or error}); choose another port with --port")


def check_port_free(address: str, port: int) -> None:
    """``VLIError`` (one line, suggesting ``--port``) when ``address:port`` cannot be listened on."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Tornado does: TIME_WAIT is no conflict
        try:
            probe.bind((address, port))
        except OSError as error:
            raise _cannot_listen(address, port, error) from None


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
    The store and the port are checked before Panel is imported (3 s) or a model loaded, so a
    wrong path or a port in use fails at once; a port taken in between fails in the same line.
    """
    ds = open_dataset(store)  # fail fast, with a readable message, before the server starts
    check_port_free(address, port)
    import panel as pn

    from vlinterpret_panel.ui.app import build_app

    if model:
        from vlinterpret_panel.ui.add_example import live_model, warm_up

        live_model(model).check_store(ds)
        warm_up(model, Path(store).resolve())  # before the server listens: no page is built beside it
    origins = [f"{host}:{port}" for host in ("localhost", "127.0.0.1", address)]
    try:
        pn.serve(
            {"app": lambda: build_app(Path(store), model=model)},
            address=address,
            port=port,
            show=show,
            allow_websocket_origin=origins,
            title="vlinterpret-panel",
        )
    except OSError as error:  # binding happens before the server runs: this is no error of a session
        if error.errno in _BIND_ERRORS:
            raise _cannot_listen(address, port, error) from None
        raise
