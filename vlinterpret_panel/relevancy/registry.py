"""Name -> method lookup, so a method is added by dropping one module into this package.

Every method module decorates its function with ``@register("name")``; the modules are
imported on the first lookup, so callers (extraction, dashboard, CLI) never list them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.relevancy.inputs import Captured
from vlinterpret_panel.relevancy.result import Relevancy

RelevancyMethod = Callable[..., Relevancy]

_METHODS: dict[str, RelevancyMethod] = {}
_SUPPORT_MODULES = {"common", "inputs", "registry", "result"}


def register(name: str) -> Callable[[RelevancyMethod], RelevancyMethod]:
    """Decorator: make ``method(captured, **options) -> Relevancy`` available as ``name``."""

    def add(method: RelevancyMethod) -> RelevancyMethod:
        if _METHODS.get(name, method) is not method:
            raise ValueError(f"relevancy method {name!r} is registered twice")
        _METHODS[name] = method
        return method

    return add


def _discover() -> None:
    """Import every method module of this package (each registers itself)."""
    package = importlib.import_module("vlinterpret_panel.relevancy")
    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in _SUPPORT_MODULES:
            importlib.import_module(f"{package.__name__}.{module.name}")


def available_methods() -> list[str]:
    """Names of all relevancy methods, sorted."""
    _discover()
    return sorted(_METHODS)


def get_method(name: str) -> RelevancyMethod:
    """The method registered as ``name``; ``VLIError`` lists the known ones otherwise."""
    _discover()
    if name not in _METHODS:
        raise VLIError(f"unknown relevancy method {name!r}; use one of {sorted(_METHODS)}")
    return _METHODS[name]


def compute_relevancy(captured: Captured, method: str, **options: Any) -> Relevancy:
    """Run the method named ``method`` on one captured example."""
    return get_method(method)(captured, **options)
