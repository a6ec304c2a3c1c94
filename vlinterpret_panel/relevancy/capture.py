"""Run a model once for a set of relevancy methods: capture what they need, then compute them.

The one place that turns "these methods" into "this run": with gradients when any method
declares ``GRADIENTS``, plus the LRP pass when any declares ``LRP`` and the AttnLRP pass when any
declares ``ATTNLRP`` (``registry.register``).
Extraction, the evaluation and the live dashboard all come through here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlinterpret_panel.adapters.base import ModelAdapter, ModelInput
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.relevancy.inputs import Captured
from vlinterpret_panel.relevancy.registry import (
    ATTENTION,
    ATTNLRP,
    GRADIENTS,
    LAYER_RULES,
    LRP,
    check_methods,
    compute_relevancy,
    needs,
)
from vlinterpret_panel.relevancy.targets import Target, entry_name
from vlinterpret_panel.schema import ExampleRecord, ModelInfo


def supports_lrp(adapter: ModelAdapter) -> bool:
    """Whether LRP rules exist for the adapter's model (the built-in models only)."""
    from vlinterpret_panel.models.layers import BaseVLModel

    return isinstance(getattr(adapter, "model", None), BaseVLModel)


def check_supported(adapter: ModelAdapter, methods: Sequence[str]) -> list[str]:
    """The checked method names; ``VLIError`` before any example runs when the adapter cannot serve one."""
    methods = check_methods(methods)
    if LAYER_RULES & needs(methods) and not supports_lrp(adapter):
        lrp_methods = sorted(m for m in methods if LAYER_RULES & needs([m]))
        raise VLIError(
            f"{', '.join(lrp_methods)} needs LRP through the model's layers, which exists for the "
            f"built-in models only, not {adapter.name!r}"
        )
    return methods


def capture_for(
    adapter: ModelAdapter, item: ModelInput, methods: Sequence[str], *, target: str | int | Target | None = None
) -> tuple[Captured, ExampleRecord, ModelInfo]:
    """One run of ``item`` capturing what ``methods`` need to explain ``target`` (``relevancy.targets``; default:
    the predicted answer); the ``Captured`` input of the methods and the record."""
    required = needs(check_supported(adapter, methods))
    record, info = adapter.run(item, target=target, gradients=GRADIENTS in required)
    captured = Captured.from_record(record, info)
    if LAYER_RULES & required:  # one recorded pass serves both
        from vlinterpret_panel.relevancy.attnlrp_rules import token_relevance_of
        from vlinterpret_panel.relevancy.lrp import attention_relevance_of, recorded_pass

        run = recorded_pass(adapter, item, target)
        if LRP in required:
            captured = dataclasses.replace(captured, attention_relevance=attention_relevance_of(run)[0])
        if ATTNLRP in required:
            captured = dataclasses.replace(captured, token_relevance=token_relevance_of(run)[0])
    return captured, record, info


def relevancy_values(
    captured: Captured, methods: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, np.ndarray]:
    """Each method's relevancy ``(T,)`` of one captured example (``options`` per method name)."""
    options = options or {}
    return {method: compute_relevancy(captured, method, **options.get(method, {})).values for method in methods}


def add_relevancy(record: ExampleRecord, captured: Captured, methods: Sequence[str]) -> None:
    """Store each method's relevancy in ``record.relevancy`` and drop the gradients (never stored)."""
    record.relevancy = relevancy_values(captured, methods)
    record.attention_gradient = None


def depends_on_target(method: str) -> bool:
    """Whether ``method`` explains a chosen output (gradient or LRP based), not only the attention."""
    return bool(needs([method]) - {ATTENTION})


def record_for_targets(
    adapter: ModelAdapter, item: ModelInput, methods: Sequence[str], targets: Sequence[str | Target]
) -> tuple[ExampleRecord, ModelInfo]:
    """One record of ``item`` holding each method's relevancy for each of ``targets`` (``relevancy.targets``).

    A method that depends on the target gets one entry per target (``targets.entry_name``: the bare name for
    ``predicted``, ``"generic [predicted vs runner-up]"`` otherwise); one that reads only attention gets its
    bare name once. The model runs once per target; the record's prediction comes from the first run.
    """
    chosen = list(dict.fromkeys(Target.parse(target) for target in targets)) or [Target()]
    dependent = [method for method in methods if depends_on_target(method)]
    independent = [method for method in methods if not depends_on_target(method)]
    if any(not target.is_default for target in chosen) and not dependent:
        raise VLIError(
            f"a target other than the predicted answer needs a gradient or LRP method; {methods} read attention only"
        )
    record: ExampleRecord | None = None
    info: ModelInfo | None = None
    values: dict[str, np.ndarray] = {}
    explained: dict[str, str] = {}
    for run, target in enumerate(chosen):
        wanted = dependent + (independent if run == 0 else [])
        captured, run_record, run_info = capture_for(adapter, item, wanted, target=target)
        if record is None:
            record, info = run_record, run_info
        for method, method_values in relevancy_values(captured, wanted).items():
            entry = method if method in independent else entry_name(method, target)
            values[entry], explained[entry] = method_values, captured.target
    assert record is not None and info is not None  # at least one target ran
    record.relevancy, record.relevancy_targets, record.attention_gradient = values, explained, None
    return record, info
