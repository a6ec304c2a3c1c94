"""Generated answers: the adapter protocol of generative models, and one example's capture.

A ``GenerativeAdapter`` does two things beyond the ``ModelAdapter`` protocol: ``generate``
(greedy decoding with the model's own fast path, SDPA or flash attention included) and
``trace`` (one forward pass over the finished sequence, handing each decoder layer's
queries, keys and values to a callback as ``relevancy.answer.LayerAttention``, and returning
the next-token logits, in the autograd graph when gradients are asked for).

``capture_answer`` turns both into an ``ExampleRecord`` whose ``answer`` holds what the
schema stores per generated token: the token, its probability and top-k alternatives, the
attention rows of the query that predicted it (chosen layers and heads), that query's
hidden states, and its relevancy by every requested method. Each layer's maps are reduced
to those rows as the trace reaches it, so the full ``[heads, T, T]`` maps of all layers are
never held at once; ``rows="all"`` also keeps the chosen layers' full maps (the ordinary
``attention`` variable), for the views that read them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from vlinterpret_panel.adapters.base import ModelAdapter, ModelInput
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.relevancy.answer import ANSWER_METHODS, GRADIENT_METHODS, AnswerRelevancy, LayerAttention
from vlinterpret_panel.relevancy.targets import Target, entry_name
from vlinterpret_panel.schema import ExampleRecord, GeneratedAnswer, ModelInfo

DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_TOP_K = 5
DEFAULT_ANSWER_METHODS: tuple[str, ...] = ("raw_attention", "rollout")
LayerCallback = Callable[[int, LayerAttention], None]


@dataclass
class Generated:
    """A greedy answer and the layout of the whole sequence it ends (prompt, image and answer tokens).

    ``answer_positions[k]`` is generated token k's position in ``tokens``; ``alternatives``
    ``[steps, k]`` the most probable tokens at each step (best first) and
    ``alternative_probabilities`` their probabilities. ``inputs`` is whatever the adapter's
    ``trace`` needs to run the sequence again.
    """

    tokens: list[str]
    modality: list[str]
    token_box: np.ndarray
    answer_positions: np.ndarray
    answer_ids: list[int]
    probabilities: np.ndarray
    alternatives: np.ndarray
    alternative_probabilities: np.ndarray
    text: str
    inputs: Any
    patch_position: np.ndarray | None = None

    @property
    def steps(self) -> int:
        return len(self.answer_ids)


@dataclass
class Trace:
    """One forward pass over a generated sequence.

    ``logits`` ``[rows, vocab]`` are the requested rows' next-token logits (row k predicts
    generated token k; in the autograd graph when gradients are on); ``hidden_states``
    ``[hidden_layer, rows, feature]`` are the states of the requested rows after each stage
    (``hidden_layer_name``), ``all_hidden_states`` ``[hidden_layer, T, feature]`` when asked.
    """

    logits: torch.Tensor
    hidden_states: np.ndarray
    hidden_layer_name: list[str]
    all_hidden_states: np.ndarray | None = None


@dataclass
class RecordedAnswer:
    """What a recording generation kept as it went: the answer rows' attention ``[layers, heads, steps, T]``
    (the stored layers and heads), their hidden states ``[hidden_layer, steps, D]`` and the
    attention-only relevancy methods' ``(steps, T)`` values."""

    attention: np.ndarray
    hidden_states: np.ndarray
    hidden_layer_name: list[str]
    relevancy: dict[str, np.ndarray]


class GenerativeAdapter(ModelAdapter):
    """A model that answers by generating tokens; ``layer_names`` names its decoder layers' attention."""

    layer_names: Sequence[str] = ()
    num_heads: int = 0

    @abc.abstractmethod
    def generate(self, image: np.ndarray, text: str, *, max_new_tokens: int, top_k: int) -> Generated:
        """Greedy answer to ``text`` about ``image``: at most ``max_new_tokens``, stopping at end-of-sequence.

        A prompt that does not fit the model's context is a ``VLIError`` naming both lengths.
        """

    @abc.abstractmethod
    def trace(
        self, generated: Generated, on_layer: LayerCallback, *, rows: Sequence[int], all_hidden: bool = False
    ) -> Trace:
        """Run ``generated``'s whole sequence once, calling ``on_layer(layer, attention)`` for each decoder layer.

        Runs with gradients when the caller enabled them (``LayerAttention.output`` then in the graph).
        """

    def token_id(self, token: str) -> int:
        """The vocabulary id of ``token`` (a target naming a token, ``relevancy.targets``); ``VLIError`` if unknown."""
        raise VLIError(f"{self.name} cannot look tokens up by name; name a vocabulary index instead")

    def generate_recorded(
        self,
        image: np.ndarray,
        text: str,
        *,
        max_new_tokens: int,
        top_k: int,
        layers: Sequence[int],
        heads: Sequence[int],
        methods: Sequence[str],
    ) -> tuple[Generated, RecordedAnswer] | None:
        """Generate while recording the answer rows (no second pass); None when the adapter cannot.

        Only asked for when no method needs gradients and only answer rows are stored.
        """
        return None


@dataclass(frozen=True)
class GenerationOptions:
    """What ``capture_answer`` generates and keeps.

    ``layers``/``heads``: the model's indices of the decoder layers and heads whose rows are
    stored (None: all); ``rows``: "answer" (the rows that predicted generated tokens) or
    "all" (also the full maps of those layers, and every token's hidden states);
    ``methods``: relevancy methods among ``relevancy.answer.ANSWER_METHODS``; by default the
    two recorded while the model generates (raw attention, rollout), as the gradient methods
    cost one backward pass per generated token. ``targets`` (``relevancy.targets``, read per step:
    e.g. ``predicted vs runner-up``) are what the gradient methods explain, each stored as its own
    entry (``targets.entry_name``; default: the generated token alone, under the bare names), one
    backward pass per generated token and target.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    top_k: int = DEFAULT_TOP_K
    layers: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    rows: Literal["answer", "all"] = "answer"
    methods: Sequence[str] = field(default_factory=lambda: list(DEFAULT_ANSWER_METHODS))
    targets: Sequence[str] = ()

    def check(self, adapter: GenerativeAdapter) -> tuple[list[int], list[int]]:
        """The stored layers and heads; ``VLIError`` for an option the model cannot honour."""
        if self.max_new_tokens < 1:
            raise VLIError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if self.top_k < 1:
            raise VLIError(f"top_k must be at least 1, not {self.top_k}")
        if self.rows not in ("answer", "all"):
            raise VLIError(f"rows must be 'answer' or 'all', not {self.rows!r}")
        unknown = sorted(set(self.methods) - set(ANSWER_METHODS))
        if unknown:
            raise VLIError(f"{', '.join(unknown)} cannot explain generated tokens; use {', '.join(ANSWER_METHODS)}")
        self.chosen_targets()
        n_layers, n_heads = len(adapter.layer_names), adapter.num_heads
        layers = list(range(n_layers)) if self.layers is None else sorted(set(self.layers))
        heads = list(range(n_heads)) if self.heads is None else sorted(set(self.heads))
        if not layers or layers[0] < 0 or layers[-1] >= n_layers:
            raise VLIError(f"layers must be chosen among 0..{n_layers - 1} ({adapter.name} has {n_layers})")
        if not heads or heads[0] < 0 or heads[-1] >= n_heads:
            raise VLIError(f"heads must be chosen among 0..{n_heads - 1} ({adapter.name} has {n_heads} per layer)")
        return layers, heads

    def chosen_targets(self) -> list[Target]:
        """The parsed targets (default: the generated token alone); ``VLIError`` for one a generated answer cannot
        have, or for targets other than the token with no gradient method to explain them."""
        chosen = list(dict.fromkeys(Target.parse(target) for target in self.targets)) or [Target()]
        for target in chosen:
            target.check_for_generation()
        if any(not target.is_default for target in chosen) and not GRADIENT_METHODS & set(self.methods):
            raise VLIError(
                f"target {', '.join(map(str, chosen))} needs a gradient method "
                f"({', '.join(sorted(GRADIENT_METHODS))}); {list(self.methods)} read attention only"
            )
        return chosen


def check_generative(adapter: ModelAdapter) -> GenerativeAdapter:
    """The adapter as a ``GenerativeAdapter``, or a ``VLIError`` saying it cannot generate."""
    if not isinstance(adapter, GenerativeAdapter):
        raise VLIError(
            f"{adapter.name} cannot generate: --generate needs a generative model "
            "(the built-in 'generative', or a LLaVA or Qwen2-VL checkpoint)"
        )
    return adapter


def capture_answer(
    adapter: GenerativeAdapter, item: ModelInput, options: GenerationOptions = GenerationOptions()
) -> tuple[ExampleRecord, ModelInfo]:
    """Generate an answer for ``item`` and capture it, token by token, into a schema record.

    ``item.answer_masks``, when given, supplies each generated token's ground-truth mask.
    """
    layers, heads = options.check(adapter)
    fast = None
    if options.rows == "answer" and not GRADIENT_METHODS & set(options.methods):
        fast = adapter.generate_recorded(
            item.image,
            item.text,
            max_new_tokens=options.max_new_tokens,
            top_k=options.top_k,
            layers=layers,
            heads=heads,
            methods=options.methods,
        )
    full_maps: np.ndarray | None = None
    all_hidden: np.ndarray | None = None
    if fast is None:
        generated = adapter.generate(item.image, item.text, max_new_tokens=options.max_new_tokens, top_k=options.top_k)
        recorded, full_maps, all_hidden = _traced(adapter, generated, options, layers, heads)
    else:
        generated, recorded = fast
    rows = [int(p) - 1 for p in generated.answer_positions]
    answer_tokens = [generated.tokens[int(p)] for p in generated.answer_positions]
    masks = None
    if item.answer_masks is not None:
        found = item.answer_masks(answer_tokens)
        blank = np.zeros(item.image.shape[:2], np.uint8)
        masks = np.stack([blank if m is None else np.asarray(m, np.uint8) for m in found])
    answer = GeneratedAnswer(
        tokens=answer_tokens,
        positions=np.asarray(generated.answer_positions, np.int32),
        probabilities=np.asarray(generated.probabilities, np.float32),
        alternatives=np.asarray(generated.alternatives, object),
        alternative_probabilities=np.asarray(generated.alternative_probabilities, np.float32),
        attention=recorded.attention,
        hidden_states=recorded.hidden_states,
        relevancy=recorded.relevancy,
        target_masks=masks,
    )
    record = ExampleRecord(
        example_id=item.example_id,
        image=item.image,
        text=item.text,
        tokens=generated.tokens,
        modality=generated.modality,
        token_box=np.asarray(generated.token_box, np.float32),
        attention=full_maps,
        hidden_states=all_hidden,
        label=item.label,
        prediction=generated.text,
        score=float(np.prod(generated.probabilities.astype(np.float64))),
        readout_tokens={"next_token": rows[0]},
        patch_position=generated.patch_position,
        target_mask=item.target_mask,
        answer=answer,
    )
    record.check()
    info = ModelInfo(
        name=adapter.name,
        layer_kind=["self"] * len(layers),
        num_heads=[len(heads)] * len(layers),
        hidden_layer_name=recorded.hidden_layer_name,
        layer_name=[adapter.layer_names[layer] for layer in layers],
        config=adapter.config,
        layer_index=layers,
        head_index=heads,
    )
    return record, info


def _traced(
    adapter: GenerativeAdapter,
    generated: Generated,
    options: GenerationOptions,
    layers: Sequence[int],
    heads: Sequence[int],
) -> tuple[RecordedAnswer, np.ndarray | None, np.ndarray | None]:
    """The answer rows of ``generated`` from one ``trace`` (and a backward pass per token for gradient methods).

    Also the chosen layers' full maps and every token's hidden states when ``options.rows`` is "all".
    """
    rows = [int(p) - 1 for p in generated.answer_positions]
    accumulator = AnswerRelevancy(rows, len(generated.tokens), len(adapter.layer_names), options.methods)
    kept_rows: dict[int, np.ndarray] = {}
    full_maps: dict[int, np.ndarray] = {}

    def on_layer(layer: int, attention: LayerAttention) -> None:
        answer_rows = accumulator.forward_layer(attention, heads)
        if layer in layers:
            kept_rows[layer] = answer_rows.numpy()
            if options.rows == "all":
                full_maps[layer] = attention.probabilities(heads=heads).numpy()

    relevancy: dict[str, np.ndarray] = {}
    with torch.set_grad_enabled(accumulator.needs_gradients):
        trace = adapter.trace(generated, on_layer, rows=rows, all_hidden=options.rows == "all")
        logits = trace.logits.detach().float().numpy()
        for run, target in enumerate(options.chosen_targets()):
            explained, versus = target.resolve_steps(logits, generated.answer_ids, adapter.token_id)
            for method, values in accumulator.backward(trace.logits, explained, versus).items():
                if method in GRADIENT_METHODS:
                    relevancy[entry_name(method, target)] = values
                elif run == 0:
                    relevancy[method] = values
    recorded = RecordedAnswer(
        attention=np.stack([kept_rows[layer] for layer in layers]),
        hidden_states=trace.hidden_states,
        hidden_layer_name=trace.hidden_layer_name,
        relevancy=relevancy,
    )
    if options.rows != "all":
        return recorded, None, None
    return recorded, np.stack([full_maps[layer] for layer in layers]), trace.all_hidden_states
