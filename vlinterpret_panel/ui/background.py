"""Slow dataset-wide computations of the views, run off the server's event loop and shared by sessions.

The first dataset summary or embedding map of a large store takes seconds to minutes. A view
asks ``pending(key, is_ready, compute)``: None means "draw now"; otherwise the computation runs
in this server's one background thread (a second session asking for the same key waits for the
same run) and the view draws a placeholder, with a ``Redraw`` that redraws it once the run is
done. Results land where the view reads them anyway (the cache beside the store, or an
in-process LRU), so the redrawn view finds them ready.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor

import holoviews as hv
import panel as pn
import xarray as xr

POLL_MS = 500

_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vli-background")
_RUNNING: dict[Hashable, Future] = {}
_RUNNING_LOCK = threading.Lock()


def pending(key: Hashable, is_ready: Callable[[], bool], compute: Callable[[], object]) -> Future | None:
    """The background run of ``compute`` for ``key``, or None when its result can be read now.

    None when ``is_ready()`` or when the run has just finished; a run that failed raises its
    error here, once (the next request starts afresh).
    """
    with _RUNNING_LOCK:
        running = _RUNNING.get(key)
        if running is not None and running.done():
            del _RUNNING[key]
            running.result()
            return None
        if running is not None:
            return running
        if is_ready():
            return None
        _RUNNING[key] = _WORKER.submit(compute)
        return _RUNNING[key]


def pending_for_store(
    ds: xr.Dataset,
    parts: tuple[Hashable, ...],
    *,
    nbytes: int,
    above: int,
    is_ready: Callable[[], bool],
    compute: Callable[[], object],
) -> Future | None:
    """``pending`` for work of ``nbytes`` on a stored dataset: None (do it now) at ``above`` bytes or less.

    Work on a dataset without a store path also runs in the request: such datasets are built
    in memory, small, and no other session shares them.
    """
    if nbytes <= above or not ds.vli.identity.stored:
        return None
    return pending(ds.vli.key(*parts), is_ready, compute)


class Redraw:
    """Redraws the DynamicMaps that take ``stream`` once the background run they wait for is done.

    HoloViews memoizes a DynamicMap's callback on its stream values: a redraw with the same
    selection needs a value that changes, which ``stream`` (a Counter) provides. The check
    runs every ``POLL_MS`` as a periodic callback of the session that drew the placeholder.
    """

    def __init__(self) -> None:
        self.stream = hv.streams.Counter()
        self.waiting_for: Future | None = None
        self._poller: pn.io.callbacks.PeriodicCallback | None = None

    def when_done(self, run: Future) -> None:
        """Redraw once ``run`` is done."""
        self.waiting_for = run
        if self._poller is None:
            self._poller = pn.state.add_periodic_callback(self.check, period=POLL_MS)

    def check(self) -> None:
        """Redraw if the awaited run is done (called by the periodic callback)."""
        if self.waiting_for is None or not self.waiting_for.done():
            return
        self.waiting_for = None
        if self._poller is not None:
            self._poller.stop()
            self._poller = None
        self.stream.event()
