"""vlinterpret-panel: see inside vision-language transformers.

``open_dataset`` opens a store lazily; ``validate`` checks a dataset against the schema.
"""

from vlinterpret_panel import accessor  # noqa: F401  (registers ds.vli)
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import SCHEMA_VERSION, ExampleRecord, ModelInfo, records_to_dataset, validate
from vlinterpret_panel.store import open_dataset, write_shard

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "ExampleRecord",
    "ModelInfo",
    "VLIError",
    "open_dataset",
    "records_to_dataset",
    "validate",
    "write_shard",
]
