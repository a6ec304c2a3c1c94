"""The dashboard: every view composed around one shared ``Selection``; built anew for each session."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import dask
import panel as pn
import param
import xarray as xr

from vlinterpret_panel.store import open_dataset, shard_signature
from vlinterpret_panel.ui.attention import AttentionHeatmap
from vlinterpret_panel.ui.common import ensure_extension, message_banner
from vlinterpret_panel.ui.compare import HeadComparison
from vlinterpret_panel.ui.embedding import EmbeddingView
from vlinterpret_panel.ui.examples import ExampleBrowser
from vlinterpret_panel.ui.export import ExportPanel
from vlinterpret_panel.ui.head_summary import HeadSummary
from vlinterpret_panel.ui.image import ImageView
from vlinterpret_panel.ui.relevancy import RelevancyView
from vlinterpret_panel.ui.selection import URL_PARAMETERS, Selection
from vlinterpret_panel.ui.text import TextView
from vlinterpret_panel.ui.tokens import TokenControls

ensure_extension()
pn.extension(notifications=False)
pn.config.loading_indicator = True


class Dashboard(pn.viewable.Viewer):
    """All views of one dataset, linked through one ``Selection``; usable inline in JupyterLab."""

    selection = param.ClassSelector(class_=Selection)

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(selection=selection or Selection.for_dataset(ds), **params)
        self._ds = ds
        selection = self.selection
        self.examples = ExampleBrowser(ds, selection)
        self.tokens = TokenControls(ds, selection)
        self.head_summary = HeadSummary(ds, selection)
        self.attention = AttentionHeatmap(ds, selection)
        self.image = ImageView(ds, selection)
        self.text = TextView(ds, selection)
        self.embedding = EmbeddingView(ds, selection)
        self.relevancy = RelevancyView(ds, selection)
        self.comparison = HeadComparison(ds, selection)
        self.export = ExportPanel(ds, selection)

    def summary(self) -> str:
        """One line naming the model and the store's sizes."""
        ds = self._ds
        return (
            f"**{ds.attrs.get('model_name', '?')}** · {ds.sizes['example']} examples · "
            f"{ds.sizes['layer']} layers × {ds.sizes['head']} heads · up to {ds.sizes['token']} tokens"
        )

    def sidebar(self) -> list[pn.viewable.Viewable]:
        """The controls: the example browser, token and head pickers, export."""
        return [pn.pane.Markdown(self.summary()), self.examples, self.tokens, self.export]

    def main(self) -> pn.viewable.Viewable:
        """The views, in tabs rendered when first opened."""
        attention = pn.Column(
            message_banner(self.selection),
            pn.Row(self.head_summary, self.attention),
            pn.Row(self.image, self.text),
        )
        return pn.Tabs(
            ("Attention", attention),
            ("Embeddings", self.embedding),
            ("Relevancy", self.relevancy),
            ("Compare heads", self.comparison),
            dynamic=True,
            sizing_mode="stretch_width",
        )

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Row(pn.Column(*self.sidebar(), width=330), self.main())


@functools.lru_cache(maxsize=4)
def shared_store(path: Path, signature: str) -> xr.Dataset:
    """The store opened once per server process and shared, read-only, by every session.

    Sessions keep their own selection and views; only the lazy Dataset (file handles and
    Dask graph) is shared. With a fresh copy per session the server segfaulted in libhdf5
    after a few sessions in the browser tests; with one shared copy it has not.
    ``signature`` changes when shards are added, so a grown store is reopened.
    """
    return open_dataset(path)


def _link_url(selection: Selection) -> None:
    """Sync ``selection`` with the page URL (a link naming what this store lacks shows a message)."""
    if pn.state.location is None:
        return

    def refuse(values: dict) -> None:
        selection.message = f"the link's state {values} does not fit this store; showing the defaults"

    pn.state.location.sync(selection, URL_PARAMETERS, on_error=refuse)


def _unlink_url(selection: Selection) -> None:
    if pn.state.location is not None:
        pn.state.location.unsync(selection)


def build_app(store: str | os.PathLike, model: str | None = None) -> pn.viewable.Viewable:
    """The dashboard page for the store at ``store``, its selection synced with the URL.

    With ``model`` (an adapter spec of the store's model), the sidebar also has "Add example".
    The server computes Dask graphs in the calling thread: a click reads one chunk, so Dask's
    thread pool gains nothing and would only add concurrent HDF5 access.
    """
    dask.config.set(scheduler="synchronous")
    path = Path(store).resolve()

    def current_store() -> xr.Dataset:
        return shared_store(path, shard_signature(path) if path.is_dir() else "")

    if model:
        from vlinterpret_panel.ui.add_example import LiveSession, live_model

        session = LiveSession(path, live_model(model), current_store, _link_url, _unlink_url)
        sidebar, main = [session.sidebar], [session.main]
    else:
        dashboard = Dashboard(current_store())
        _link_url(dashboard.selection)
        sidebar, main = dashboard.sidebar(), [dashboard.main()]
    # No header spinner: pn.state.busy spans every session of the server process, so one
    # session's clicks would spin all the others' (per-view loading indicators stay per session).
    template = pn.template.BootstrapTemplate(
        title="vlinterpret-panel",
        sidebar=sidebar,
        main=main,
        sidebar_width=340,
        header_background="#1f3b57",
    )
    if model:
        session.design = template.design
    return template
