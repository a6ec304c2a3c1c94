"""vlinterpret-panel: see inside vision-language transformers.

``open_dataset`` opens a store lazily; ``validate`` checks a dataset against the schema.
"""

from vlinterpret_panel import accessor  # noqa: F401  (registers ds.vli)
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import SCHEMA_VERSION, ExampleRecord, ModelInfo, records_to_dataset, validate
from vlinterpret_panel.store import open_dataset, write_shard

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``vlinterpret_panel.Dashboard``, imported on first use (HoloViews' plotting takes seconds to load)."""
    if name == "Dashboard":
        from vlinterpret_panel.ui import Dashboard

        return Dashboard
    raise AttributeError(f"module 'vlinterpret_panel' has no attribute {name!r}")


__all__ = [
    "SCHEMA_VERSION",
    "Dashboard",
    "ExampleRecord",
    "ModelInfo",
    "VLIError",
    "open_dataset",
    "records_to_dataset",
    "validate",
    "write_shard",
]
