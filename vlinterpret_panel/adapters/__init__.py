"""Adapters: one small interface between any model and the schema (see ``base.py``)."""

from vlinterpret_panel.adapters.base import (
    AttentionCapture,
    ForwardCapture,
    HiddenCapture,
    ModelAdapter,
    ModelInput,
)

__all__ = ["AttentionCapture", "ForwardCapture", "HiddenCapture", "ModelAdapter", "ModelInput"]
