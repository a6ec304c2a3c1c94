"""Decode untrusted pickles that may hold only NumPy arrays, NumPy scalars and builtin values.

A pickle is a program: unpickling calls whatever global it names, so opening a foreign
database with ``pickle.loads`` runs its author's code. ``safe_loads`` resolves globals from
a short allowlist (what NumPy needs to rebuild arrays, dtypes and scalars, plus a few
builtin containers), refuses every other global before it is imported or called, and then
checks that the decoded value is made of admitted types only.
"""

from __future__ import annotations

import codecs
import importlib
import io
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np

from vlinterpret_panel.errors import VLIError


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside the allowlist; nothing of it was imported or called."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"


def _numpy_function(name: str) -> Callable[..., Any]:
    """A private NumPy reconstruction helper, from ``numpy._core`` (NumPy 2) or ``numpy.core`` (1.x)."""
    module_name, _, attribute = name.rpartition(".")
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{module_name}"), attribute)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"NumPy has no {name}")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Python 2 style protocol-2 pickles spell bytes as ``_codecs.encode(text, 'latin1')``; admit only that."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise RefusedGlobal("_codecs", f"encode with encoding {encoding!r}")
    return text.encode("latin1")


_RECONSTRUCT = _numpy_function("multiarray._reconstruct")
_SCALAR = _numpy_function("multiarray.scalar")
_FROMBUFFER = _numpy_function("numeric._frombuffer")

# (module, name) as written in the pickle -> the object it stands for. Both NumPy module
# spellings appear in the wild: NumPy 1.x writes numpy.core, NumPy 2 writes numpy._core.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(f"{package}.multiarray", "_reconstruct"): _RECONSTRUCT for package in ("numpy.core", "numpy._core")},
    **{(f"{package}.multiarray", "scalar"): _SCALAR for package in ("numpy.core", "numpy._core")},
    **{(f"{package}.numeric", "_frombuffer"): _FROMBUFFER for package in ("numpy.core", "numpy._core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _latin1_encode,
}

_PLAIN_TYPES = (str, bytes, bytearray, int, float, complex, bool, type(None))
_CONTAINER_TYPES = (dict, list, tuple, set, frozenset)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose globals come only from ``ALLOWED_GLOBALS``."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not supported")


def _check_admitted(value: Any) -> None:
    """Raise ``TypeError`` naming the first value that is not a builtin container, scalar or plain array."""
    pending, seen = [value], set()
    while pending:
        item = pending.pop()
        if isinstance(item, np.ndarray | np.generic):
            if not (type(item) is np.ndarray or isinstance(item, np.generic)) or item.dtype.hasobject:
                raise TypeError(f"array of type {type(item).__name__} with dtype {item.dtype}")
            continue
        if type(item) in _CONTAINER_TYPES:
            if id(item) in seen:
                continue
            seen.add(id(item))
            # Keys and values, not items(): ids in ``seen`` must belong to objects that stay alive.
            pending.extend([*item.keys(), *item.values()] if isinstance(item, dict) else item)
            continue
        if type(item) not in _PLAIN_TYPES:
            raise TypeError(f"object of type {type(item).__module__}.{type(item).__qualname__}")


def safe_loads(data: bytes, *, source: str) -> Any:
    """Unpickle ``data`` admitting only NumPy arrays and builtin values; ``source`` names it in errors.

    Raises ``VLIError`` for a refused global (before it is imported or called), for a value
    of any other type, and for a damaged pickle.
    """
    try:
        value = RestrictedUnpickler(io.BytesIO(data)).load()
    except RefusedGlobal as refused:
        raise VLIError(f"refusing to unpickle global '{refused.qualified_name}' in {source}") from None
    except Exception as error:  # a damaged pickle raises many types (EOFError, ValueError, TypeError...)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise VLIError(f"{source}: not a readable pickle ({reason})") from None
    try:
        _check_admitted(value)
    except TypeError as error:
        raise VLIError(
            f"refusing to unpickle {error} in {source}; only NumPy arrays and builtin values are admitted"
        ) from None
    return value
