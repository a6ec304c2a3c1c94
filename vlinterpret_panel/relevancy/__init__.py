"""Relevancy methods as pure functions over captured attention and gradients.

Every method has one signature, ``method(captured, **options) -> Relevancy``; ``Captured``
holds one example (build it with ``Captured.from_record(record, info)`` after an adapter's
``run(..., gradients=True)``, or ``Captured.from_dataset(ds, example)`` for stored attention).
``compute_relevancy(captured, "generic")`` looks methods up by name. See ``docs/relevancy.md``.
"""

from vlinterpret_panel.relevancy.attnlrp import attnlrp
from vlinterpret_panel.relevancy.attribution import transformer_attribution
from vlinterpret_panel.relevancy.generic import generic_relevancy
from vlinterpret_panel.relevancy.gradcam import attention_gradcam
from vlinterpret_panel.relevancy.inputs import Captured
from vlinterpret_panel.relevancy.raw import raw_attention
from vlinterpret_panel.relevancy.registry import available_methods, compute_relevancy, get_method, register
from vlinterpret_panel.relevancy.result import Relevancy
from vlinterpret_panel.relevancy.rollout import rollout

__all__ = [
    "Captured",
    "Relevancy",
    "attention_gradcam",
    "attnlrp",
    "available_methods",
    "compute_relevancy",
    "generic_relevancy",
    "get_method",
    "raw_attention",
    "register",
    "rollout",
    "transformer_attribution",
]
