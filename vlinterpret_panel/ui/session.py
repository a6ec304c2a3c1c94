"""A live session: one browser session's dashboard over a store that grows, plus "Add example".

The session's dashboard follows the store: this session's addition (which it then selects),
or another session's or writer's shard, found by a periodic check, keeping the selection.
The dashboard is never rebuilt: it is given the reopened store (``Dashboard.show_store``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import panel as pn
import xarray as xr

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.live import AddedExample, LiveModel
from vlinterpret_panel.store import shard_signature
from vlinterpret_panel.ui.add_example import AddExample
from vlinterpret_panel.ui.common import next_tick
from vlinterpret_panel.ui.dashboard import Dashboard
from vlinterpret_panel.ui.selection import batched

STORE_POLL_MS = 2000


class LiveSession:
    """One session's dashboard over ``store`` with the live ``model``'s "Add example" form.

    ``open_store()`` returns the shared, current store.
    """

    def __init__(self, store: Path, model: LiveModel, open_store: Callable[[], xr.Dataset]) -> None:
        self.store, self._open_store = Path(store), open_store
        ds = open_store()
        model.check_store(ds)
        self.dashboard = Dashboard(ds, live=model, store=self.store, on_added=self._edited)
        self._signature = ds.attrs.get("store_signature", "")
        self.add_example = AddExample(model, self.store, self._added)
        self.sidebar = pn.Column(*self.dashboard.sidebar(), self.add_example, sizing_mode="stretch_width")
        self.main = self.dashboard.main()
        if pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
            # Polled once the page has loaded: a session no browser connected to (a health check's GET) redrew
            # its views when the store grew, and each HoloViews plot of an unconnected page reschedules its
            # redraw every tick until Bokeh drops the session: a busy loop that held the server's GIL for
            # 4-22 s and stalled the connected sessions' edits.
            pn.state.onload(self._start_polling)

    def _start_polling(self) -> None:
        pn.state.add_periodic_callback(self._poll, period=STORE_POLL_MS)

    def _show(self, ds: xr.Dataset, example: str | None = None) -> None:
        self._signature = ds.attrs.get("store_signature", "")
        self.dashboard.show_store(ds, example)

    def _added(self, added: AddedExample) -> None:
        self._show(self._open_store(), example=added.example_id)

    def _edited(self, added: AddedExample) -> None:
        """Show the grown store, staying on the original, and compare it with the new counterfactual.

        The comparison is drawn first; the other views follow on the next tick. (Selecting the
        counterfactual redrew every view twice: 2.1 s from "Run edit" to the comparison, of
        which 0.3 s was the model.)
        """
        ds = self._open_store()
        self._signature = ds.attrs.get("store_signature", "")
        # One message with the pair's caption, table and plots (the caption reached the page ~0.2 s before its
        # plots), and at most one walk over the page's models, at the end, instead of one per plot.
        with batched():
            self.dashboard.counterfactual.show_edit(ds, added.example_id)

        def the_rest() -> None:
            with batched():
                self.dashboard.counterfactual.clear()
                self._show(ds)

        next_tick(the_rest)  # the comparison reaches the page first

    def _poll(self) -> None:
        if self.add_example.running or self.dashboard.counterfactual.running:
            # This session's own run shows its result when it returns; the check raced it (its shard written,
            # the callback not yet resumed) in a run of five, showing the grown store twice.
            return
        signature = shard_signature(self.store)
        if signature == self._signature:
            return
        self._signature = signature  # one attempt per change of the store
        try:
            self._show(self._open_store())
        except VLIError as error:  # e.g. a foreign shard dropped into the store: say so, keep the old view
            self.dashboard.selection.message = f"the store changed and cannot be reopened: {error}"
