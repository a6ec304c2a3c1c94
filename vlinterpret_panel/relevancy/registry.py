"""Name -> method lookup, with what each method needs, so callers never list methods themselves.

Every method module decorates its function with ``@register("name", needs=...)``; the
modules are imported on the first lookup. ``needs`` declares what a run must capture for
the method (as captum's attribution classes declare theirs): ``ATTENTION`` (the maps),
``GRADIENTS`` (d target / d each map, one backward pass per example), ``LRP`` (the LRP
relevance of each map, built-in models only) and ``ATTNLRP`` (AttnLRP's relevance of each token,
built-in models only). ``capture.capture_for`` asks the registry
what to capture; a baseline such as ``random`` needs nothing.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.relevancy.inputs import Captured
from vlinterpret_panel.relevancy.result import Relevancy

RelevancyMethod = Callable[..., Relevancy]

ATTENTION, GRADIENTS, LRP, ATTNLRP = "attention", "gradients", "lrp", "attnlrp"
CAPABILITIES = (ATTENTION, GRADIENTS, LRP, ATTNLRP)
# Capabilities that propagate through the model's own layers: the built-in models only.
LAYER_RULES = frozenset({LRP, ATTNLRP})


@dataclass(frozen=True)
class MethodEntry:
    """A registered method and what a run must capture for it."""

    name: str
    function: RelevancyMethod
    needs: frozenset[str]


_METHODS: dict[str, MethodEntry] = {}
_SUPPORT_MODULES = {
    "capture",
    "common",
    "evaluate",
    "inputs",
    "localisation",
    "lrp",
    "attnlrp_rules",
    "registry",
    "result",
    "targets",
    "chosen",
}


def register(name: str, *, needs: Iterable[str]) -> Callable[[RelevancyMethod], RelevancyMethod]:
    """Decorator: make ``method(captured, **options) -> Relevancy`` available as ``name``, needing ``needs``."""
    wanted = frozenset(needs)
    unknown = sorted(wanted - set(CAPABILITIES))
    if unknown:
        raise ValueError(f"relevancy method {name!r}: unknown needs {unknown}; use some of {CAPABILITIES}")

    def add(method: RelevancyMethod) -> RelevancyMethod:
        known = _METHODS.get(name)
        if known is not None and known.function is not method:
            raise ValueError(f"relevancy method {name!r} is registered twice")
        _METHODS[name] = MethodEntry(name, method, wanted)
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


def method_entry(name: str) -> MethodEntry:
    """The method registered as ``name``; ``VLIError`` lists the known ones otherwise."""
    _discover()
    if name not in _METHODS:
        raise VLIError(f"unknown relevancy method {name!r}; use one of {sorted(_METHODS)}")
    return _METHODS[name]


def get_method(name: str) -> RelevancyMethod:
    """The function registered as ``name``."""
    return method_entry(name).function


def needs(methods: Iterable[str]) -> frozenset[str]:
    """What a run must capture for all of ``methods`` together."""
    return frozenset().union(*(method_entry(name).needs for name in methods))


def check_methods(methods: Iterable[str]) -> list[str]:
    """The method names, stripped, each registered and listed once (else ``VLIError``)."""
    names = [name.strip() for name in methods if name.strip()]
    if len(set(names)) != len(names):
        raise VLIError(f"relevancy methods listed twice: {names}")
    for name in names:
        method_entry(name)
    return names


def compute_relevancy(captured: Captured, method: str, **options: Any) -> Relevancy:
    """Run the method named ``method`` on one captured example."""
    return get_method(method)(captured, **options)
