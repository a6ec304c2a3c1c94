"""The dashboard page: a ``Dashboard`` (or a live session) in a template, its selection synced with the URL."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import dask
import panel as pn
import param
import xarray as xr

from vlinterpret_panel.schema import require_full_attention
from vlinterpret_panel.store import open_dataset, shard_signature
from vlinterpret_panel.ui.common import SIDEBAR_WIDTH, next_tick
from vlinterpret_panel.ui.dashboard import AnswerDashboard, Dashboard
from vlinterpret_panel.ui.selection import URL_PARAMETERS, Selection

__all__ = ["Dashboard", "build_app", "shared_store"]


@functools.lru_cache(maxsize=4)
def shared_store(path: Path, signature: str) -> xr.Dataset:
    """The store opened once per server process and shared, read-only, by every session.

    Sessions keep their own selection and views; only the lazy Dataset (file handles and
    Dask graph) is shared. With a fresh copy per session the server segfaulted in libhdf5
    after a few sessions in the browser tests; with one shared copy it has not.
    ``signature`` changes when shards are added, so a grown store is reopened.
    """
    return open_dataset(path)


def _link_url(selection: Selection, views: Sequence[tuple[param.Parameterized, dict[str, str]]] = ()) -> None:
    """Sync ``selection``, then the ``views``' own state, with the page URL (a link naming what this store lacks
    shows a message). The views come after the selection: choosing an example resets what a view shows of it."""
    if pn.state.location is None:
        return

    def refuse(values: dict) -> None:
        selection.message = f"the link's state {values} does not fit this store; showing the defaults"

    synced = [(selection, dict(URL_PARAMETERS)), *views]
    location = pn.state.location
    for owner, parameters in synced:
        location.sync(owner, parameters, on_error=refuse)

    def complete(event: param.parameterized.Event) -> None:
        """Put the state a page's URL lacks into it. The page sends its own URL once it loads (a bare link has no
        query), which wiped the query ``sync`` had written: the URL then named only what changed next, and a
        copied link reopened other state."""
        query = location.query_params
        values = {
            name: url_value(owner, parameter) for owner, parameters in synced for parameter, name in parameters.items()
        }
        missing = {name: value for name, value in values.items() if name not in query and value is not None}
        if not missing:
            return
        as_query = cast("dict[str, Any]", missing)  # Panel types each value as a Mapping
        # Written on the next tick: a change made while the page's own value is applied is not sent back.
        next_tick(lambda: location.update_query(**as_query))

    location.param.watch(complete, "search")


def url_value(owner: param.Parameterized, parameter: str) -> str | None:
    """``owner.parameter`` as a URL holds it: the param's serialization, JSON if not text (None: not written).

    Unlike ``Location.sync``, a None value its param serializes (the head mean, ``head=mean``) is written too."""
    value = owner.param[parameter].serialize(getattr(owner, parameter))
    return None if value is None else value if isinstance(value, str) else json.dumps(value)


def build_app(store: str | os.PathLike, model: str | None = None) -> pn.template.BaseTemplate:
    """The dashboard page for the store at ``store``, its selection synced with the URL.

    With ``model`` (an adapter spec of the store's model), the sidebar also has "Add example".
    The server computes Dask graphs in the calling thread: a click reads one chunk, so Dask's
    thread pool gains nothing and would only add concurrent HDF5 access.
    """
    dask.config.set(scheduler="synchronous")
    path = Path(store).resolve()

    def current_store() -> xr.Dataset:
        return shared_store(path, shard_signature(path) if path.is_dir() else "")

    dashboard: Dashboard | AnswerDashboard
    if model:
        from vlinterpret_panel.ui.add_example import live_model, warm_up
        from vlinterpret_panel.ui.session import LiveSession

        session = LiveSession(path, live_model(model), current_store)
        warm_up(model, path)
        dashboard = session.dashboard
        sidebar: list[pn.viewable.Viewable | pn.viewable.Viewer] = [session.sidebar]
        main = [session.main]
    else:
        opened = current_store()
        if "attention" not in opened and opened.vli.has_answers:
            answers = AnswerDashboard(opened)
            dashboard, sidebar, main = answers, answers.sidebar(), [answers.main()]
        else:
            require_full_attention(opened, "the dashboard")
            full = Dashboard(opened)
            dashboard, sidebar, main = full, full.sidebar(), [full.main()]
    _link_url(dashboard.selection, dashboard.url_state())
    # No header spinner (busy_indicator=None; templates add one by default): pn.state.busy spans
    # every session of the server process, so one session's clicks spun all the others' headers, and
    # it kept spinning ~0.45 s after the views had redrawn. Per-view loading indicators stay per session.
    return pn.template.BootstrapTemplate(
        title="vlinterpret-panel",
        sidebar=sidebar,
        main=main,
        sidebar_width=SIDEBAR_WIDTH,
        header_background="#1f3b57",
        busy_indicator=None,
    )
