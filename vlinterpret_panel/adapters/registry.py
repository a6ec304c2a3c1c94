"""``load_adapter(spec)``: one string names any model the tool can run.

Spec syntax (see docs/adapters.md):

* ``NAME`` or ``builtin:NAME``: a built-in model (``single_stream``, ...), registered by
  ``vlinterpret_panel.adapters.builtin`` through ``register_builtin``;
* ``vilt:PATH``, ``clip:PATH``, ``lxmert:PATH``, ``llava:PATH``, ``qwen2_vl:PATH``: a Hugging Face checkpoint (Hub
  name or local directory) run by that family's adapter;
* ``PATH``: a Hugging Face checkpoint whose family is read from its ``config.json``
  (``model_type``);
* ``py:package.module:factory``: any callable returning a ``ModelAdapter`` (custom adapters).

Keyword ``options`` go to the adapter's factory (e.g. ``regions=...`` for LXMERT).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from vlinterpret_panel.adapters.base import ModelAdapter
from vlinterpret_panel.errors import VLIError

AdapterFactory = Callable[..., ModelAdapter]

# model_type in a checkpoint's config.json -> "module:class" of its adapter
HF_FAMILIES: dict[str, str] = {
    "vilt": "vlinterpret_panel.adapters.hf_vilt:ViltAdapter",
    "clip": "vlinterpret_panel.adapters.hf_clip:ClipAdapter",
    "lxmert": "vlinterpret_panel.adapters.hf_lxmert:LxmertAdapter",
    "llava": "vlinterpret_panel.adapters.hf_llava:LlavaAdapter",
    "qwen2_vl": "vlinterpret_panel.adapters.hf_qwen2vl:Qwen2VLAdapter",
}

# The registration point for our built-in models: ``vlinterpret_panel.adapters.builtin``
# calls ``register_builtin(name, factory)`` for each when it is imported.
_BUILTINS: dict[str, AdapterFactory] = {}
BUILTIN_MODULE = "vlinterpret_panel.adapters.builtin"


def register_builtin(name: str, factory: AdapterFactory) -> None:
    """Make ``load_adapter(name)`` and ``load_adapter("builtin:" + name)`` call ``factory(**options)``."""
    _BUILTINS[name] = factory


def builtin_names() -> list[str]:
    """Names of the registered built-in models."""
    _import_builtins()
    return sorted(_BUILTINS)


def _import_builtins() -> None:
    try:
        importlib.import_module(BUILTIN_MODULE)
    except ModuleNotFoundError as error:
        if error.name != BUILTIN_MODULE:
            raise


def _import_object(target: str, spec: str) -> Any:
    """``package.module:attribute`` -> the attribute."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise VLIError(f"adapter spec {spec!r}: write py:package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise VLIError(f"adapter spec {spec!r}: cannot import {module_name!r} ({error})") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise VLIError(f"adapter spec {spec!r}: {module_name} has no {attribute!r}") from None


def _model_type(name_or_path: str) -> str:
    """The ``model_type`` of a Hugging Face checkpoint (reads its config only)."""
    from transformers import AutoConfig

    from vlinterpret_panel.adapters.hf_common import load_pretrained

    config = load_pretrained(AutoConfig.from_pretrained, name_or_path, "model configuration")
    return str(config.model_type)


def load_adapter(spec: str, **options: Any) -> ModelAdapter:
    """The adapter a spec string names (syntax in the module docstring), built with ``options``."""
    spec = spec.strip()
    if not spec:
        raise VLIError("adapter spec is empty; give a built-in name, a Hugging Face model name or path")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "py":
        factory = _import_object(rest, spec)
        adapter = factory(**options)
        if not isinstance(adapter, ModelAdapter):
            raise VLIError(f"adapter spec {spec!r}: the factory returned {type(adapter).__name__}, not a ModelAdapter")
        return adapter
    builtin = rest if sep and prefix == "builtin" else (spec if not sep and spec in builtin_names() else None)
    if builtin is not None:
        name = builtin
        _import_builtins()
        if name not in _BUILTINS:
            known = ", ".join(sorted(_BUILTINS)) or "none registered"
            raise VLIError(f"adapter spec {spec!r}: unknown built-in model {name!r} ({known})")
        return _BUILTINS[name](**options)
    if sep and prefix in HF_FAMILIES:
        family, name_or_path = prefix, rest
    else:
        try:
            family, name_or_path = _model_type(spec), spec
        except VLIError as error:
            if "/" in spec or sep:
                raise
            known = ", ".join(builtin_names()) or "none registered yet"
            raise VLIError(f"{spec!r} is no built-in model ({known}) and {error}") from None
        if family not in HF_FAMILIES:
            raise VLIError(
                f"adapter spec {spec!r}: model type {family!r} has no adapter; "
                f"supported: {', '.join(sorted(HF_FAMILIES))} (or write a custom adapter, docs/adapters.md)"
            )
    adapter_class = _import_object(HF_FAMILIES[family], spec)
    return adapter_class.from_pretrained(name_or_path, **options)
