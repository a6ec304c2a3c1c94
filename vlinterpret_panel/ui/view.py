"""The base of every dashboard view: the dataset and the shared selection as params.

As in Panel's "structure a data store" pattern, a view only says what it draws from
``self.ds`` and ``self.selection``. When the store grows (an added example, another
writer's shard) the dashboard sets ``ds`` on every view: its plots redraw through
``streams`` (which include the dataset) and ``dataset_changed`` refreshes whatever the view
derived from the old dataset (option lists, bounds), so nothing is rebuilt.
"""

from __future__ import annotations

import holoviews as hv
import panel as pn
import param
import xarray as xr

from vlinterpret_panel.ui.selection import Selection


class View(pn.viewable.Viewer):
    """A view of ``ds`` that shows and sets ``selection``; subclasses implement ``__panel__``."""

    # Annotated for type checkers: param's descriptors type their values as Optional.
    ds: xr.Dataset = param.ClassSelector(  # type: ignore[assignment]
        class_=xr.Dataset, doc="the dataset shown; a grown store arrives as a new value"
    )
    selection: Selection = param.ClassSelector(  # type: ignore[assignment]
        class_=Selection, doc="what the user looks at, shared by every view"
    )

    def __init__(self, ds: xr.Dataset, selection: Selection | None = None, **params) -> None:
        super().__init__(ds=ds, selection=selection or Selection.for_dataset(ds), **params)
        self.param.watch(lambda event: self.dataset_changed(), "ds")

    def streams(self, *names: str) -> list[hv.streams.Stream]:
        """Streams of the selection's ``names`` and of the dataset, for a DynamicMap of this view.

        Its callback takes the selection fields by name and the dataset as ``ds``.
        """
        return [hv.streams.Params(self.selection, list(names)), hv.streams.Params(self, ["ds"])]

    def dataset_changed(self) -> None:
        """Refresh what the view derived from the previous ``ds`` (nothing by default)."""
