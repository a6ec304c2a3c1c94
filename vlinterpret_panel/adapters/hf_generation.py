"""Generation for Hugging Face decoder VLMs (LLaVA, Qwen2-VL): ``generate`` and ``trace`` over SDPA.

``generate`` is the model's own ``generate`` (greedy, KV cache, SDPA) with ``output_logits``
for each step's distribution. ``trace`` runs the finished sequence once with the recording
SDPA function (``sdpa_recording``): each language-model layer's queries and keys go to the
callback, hooks keep the answer rows' hidden states, and only the answer rows' logits are
computed (``logits_to_keep``). A family adapter supplies ``_encode`` (the processor's inputs
for one image and prompt) and ``_layout`` (tokens, modality, boxes and patch positions of a
sequence), and sets ``_layers`` (the language model's attention modules, in order) and
``_decoder_layers`` (the decoder blocks whose outputs are the hidden states).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from vlinterpret_panel.adapters.generative import Generated, GenerativeAdapter, LayerCallback, RecordedAnswer, Trace
from vlinterpret_panel.adapters.hf_common import forward_hooks
from vlinterpret_panel.adapters.sdpa_recording import (
    RECORDING_ATTENTION,
    attention_implementation,
    recording,
    register_recording_attention,
)
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.relevancy.answer import IncrementalRollout, LayerAttention
from vlinterpret_panel.schema import SPECIAL, TEXT


class _GenerationRecorder:
    """Keeps, call by call of a KV-cached generation, what the store needs of the last query row.

    Each model call's last row predicts the next token: the prefill's row ``P - 1``, then one
    row per decoding step. Per call and layer: that row's attention (stored layers and heads),
    the last layer's head mean (raw attention), the rollout rows (``IncrementalRollout``),
    and the row's hidden state after the embeddings and each decoder layer.
    """

    def __init__(
        self, n_layers: int, layers: Sequence[int], heads: Sequence[int], methods: Sequence[str], max_new_tokens: int
    ) -> None:
        self.n_layers = n_layers
        self.heads = torch.as_tensor(list(heads), dtype=torch.long)
        self.rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        self.methods = [m for m in methods if m in ("raw_attention", "rollout")]
        self.raw: list[torch.Tensor] = []
        self.rollout: IncrementalRollout | None = None
        self.max_new_tokens = max_new_tokens
        self.states: list[torch.Tensor] = []

    def on_layer(self, layer: int, attention: LayerAttention) -> None:
        queries, keys = int(attention.query.shape[1]), int(attention.key.shape[1])
        row = attention.probabilities(rows=torch.tensor([queries - 1]))[:, 0]  # [H, keys]
        if layer in self.rows:
            self.rows[layer].append(row[self.heads])
        if layer == self.n_layers - 1:
            self.raw.append(row.mean(dim=0))
        if "rollout" in self.methods:
            if self.rollout is None:
                self.rollout = IncrementalRollout(self.n_layers, keys + self.max_new_tokens)
            if queries > 1:
                self.rollout.add(layer, attention.head_mean(), 0)
            else:
                self.rollout.add(layer, row.mean(dim=0)[None], keys - 1)

    def keep_input(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        embeds = kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else args[0]
        self.states.append(embeds[0, -1].detach().float())

    def keep_output(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        self.states.append(hidden[0, -1].detach().float())

    def finish(self, generated: Generated) -> RecordedAnswer:
        """The recorded rows, padded to the whole sequence, one per generated token."""
        steps, n_tokens = generated.steps, len(generated.tokens)
        calls = len(self.raw)
        if calls != steps or len(self.states) != steps * (self.n_layers + 1):
            raise VLIError(f"recorded {calls} model calls for {steps} generated tokens")

        def padded(rows: list[torch.Tensor]) -> torch.Tensor:
            out = torch.zeros(*rows[0].shape[:-1], len(rows), n_tokens)
            for step, values in enumerate(rows):
                out[..., step, : values.shape[-1]] = values
            return out

        attention = torch.stack([padded(self.rows[layer]) for layer in sorted(self.rows)])
        hidden = torch.stack(self.states).reshape(steps, self.n_layers + 1, -1).transpose(0, 1)
        query_rows = [int(p) - 1 for p in generated.answer_positions]
        relevancy: dict[str, np.ndarray] = {}
        if "raw_attention" in self.methods:
            relevancy["raw_attention"] = padded(self.raw).numpy()
        if "rollout" in self.methods and self.rollout is not None:
            relevancy["rollout"] = self.rollout.rows(query_rows, n_tokens)
        for values in relevancy.values():
            for step, row in enumerate(query_rows):
                values[step, row:] = 0.0  # its own entry (the read-out convention) and the tokens not yet there
        return RecordedAnswer(
            attention=attention.numpy(),
            hidden_states=hidden.numpy(),
            hidden_layer_name=["embeddings", *(f"layers.{i}" for i in range(self.n_layers))],
            relevancy=relevancy,
        )


class HFGenerativeAdapter(GenerativeAdapter):
    """The generation half of a Hugging Face decoder VLM adapter (see the module docstring)."""

    model: Any
    tokenizer: Any
    _layers: Sequence[nn.Module]
    _decoder_layers: Sequence[nn.Module]
    _language_model: nn.Module

    @abc.abstractmethod
    def _encode(self, image: np.ndarray, text: str) -> dict[str, torch.Tensor]:
        """The processor's tensors for one image and prompt (``input_ids`` ``[1, P]`` among them)."""

    @abc.abstractmethod
    def _layout(
        self, ids: Sequence[int], image: np.ndarray, encoded: dict[str, torch.Tensor]
    ) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
        """Tokens, modality, pixel boxes and patch positions of the sequence ``ids``."""

    def _context_length(self) -> int | None:
        text_config = getattr(self.model.config, "text_config", self.model.config)
        limit = getattr(text_config, "max_position_embeddings", None)
        return int(limit) if limit else None

    def token_id(self, token: str) -> int:
        """The id of ``token`` as the alternatives list it (``▁red``), or of a word the tokenizer makes one token."""
        vocabulary = self.tokenizer.get_vocab()
        if token in vocabulary:
            return int(vocabulary[token])
        pieces: list[int] = []
        for text in (f" {token}", token):
            pieces = self.tokenizer.encode(text, add_special_tokens=False)
            if len(pieces) == 1:
                return int(pieces[0])
        raise VLIError(
            f"{token!r} is not one token of {self.name}'s vocabulary (it tokenizes to "
            f"{self.tokenizer.convert_ids_to_tokens(pieces)}); name one token, as the alternatives list them"
        )

    def generate(self, image: np.ndarray, text: str, *, max_new_tokens: int, top_k: int) -> Generated:
        """Greedy decoding with the model's own ``generate`` (KV cache, SDPA), each step's distribution kept."""
        return self._generate(image, text, max_new_tokens=max_new_tokens, top_k=top_k)

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
    ) -> tuple[Generated, RecordedAnswer]:
        """``generate`` with each model call's last query row recorded: the prefill's (it predicts the first
        token), then each decoding step's single row. No second pass over the sequence."""
        recorder = _GenerationRecorder(len(self._layers), layers, heads, methods, max_new_tokens)
        with (
            recording(self._layers, recorder.on_layer),
            forward_hooks((self._language_model, recorder.keep_input), pre_with_kwargs=True),
            forward_hooks(*((layer, recorder.keep_output) for layer in self._decoder_layers)),
        ):
            generated = self._generate(image, text, max_new_tokens=max_new_tokens, top_k=top_k)
        return generated, recorder.finish(generated)

    def _generate(self, image: np.ndarray, text: str, *, max_new_tokens: int, top_k: int) -> Generated:
        if max_new_tokens < 1:
            raise VLIError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        encoded = self._encode(image, text)
        prompt_length = int(encoded["input_ids"].shape[1])
        limit = self._context_length()
        if limit is not None and prompt_length >= limit:
            raise VLIError(
                f"{self.name}: the prompt takes {prompt_length} tokens with its image tokens; "
                f"the model's context holds {limit}"
            )
        steps = max_new_tokens if limit is None else min(max_new_tokens, limit - prompt_length)
        register_recording_attention()
        with attention_implementation(self.model, RECORDING_ATTENTION), torch.no_grad():
            output = self.model.generate(
                **encoded,
                max_new_tokens=steps,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                output_logits=True,
                return_dict_in_generate=True,
            )
        sequence = output.sequences[0]
        answer_ids = sequence[prompt_length:].tolist()
        if not answer_ids:
            raise VLIError(f"{self.name}: generated no token")
        distributions = torch.stack(output.logits)[:, 0].float().softmax(dim=-1)[: len(answer_ids)]
        chosen = distributions[torch.arange(len(answer_ids)), torch.as_tensor(answer_ids)]
        best = distributions.topk(min(top_k, distributions.shape[-1]), dim=-1)
        tokens, modality, boxes, positions = self._layout(sequence.tolist(), image, encoded)
        special = set(self.tokenizer.all_special_ids)
        for index, token_id in enumerate(answer_ids, start=prompt_length):
            modality[index] = SPECIAL if token_id in special else TEXT
        alternatives = [self.tokenizer.convert_ids_to_tokens(row) for row in best.indices.tolist()]
        return Generated(
            tokens=tokens,
            modality=modality,
            token_box=boxes,
            answer_positions=np.arange(prompt_length, prompt_length + len(answer_ids)),
            answer_ids=answer_ids,
            probabilities=chosen.numpy(),
            alternatives=np.array([[str(t) for t in row] for row in alternatives], dtype=object),
            alternative_probabilities=best.values.numpy(),
            text=self.tokenizer.decode(answer_ids, skip_special_tokens=True).strip(),
            inputs=(encoded, sequence[None]),
            patch_position=positions.astype(np.int16),
        )

    def trace(
        self, generated: Generated, on_layer: LayerCallback, *, rows: Sequence[int], all_hidden: bool = False
    ) -> Trace:
        """One SDPA pass over the whole sequence, each language-model layer recorded; the rows' logits."""
        encoded, sequence = generated.inputs
        prompt_shape = encoded["input_ids"].shape
        added = sequence.shape[1] - prompt_shape[1]
        extra = {}
        for name, value in encoded.items():
            if name in ("input_ids", "attention_mask"):
                continue
            if isinstance(value, torch.Tensor) and value.shape == prompt_shape:  # per-token, e.g. mm_token_type_ids
                value = torch.cat([value, value.new_zeros(1, added)], dim=1)
            extra[name] = value
        index = torch.as_tensor(list(rows), dtype=torch.long)
        kept = slice(None) if all_hidden else index  # by default only the answer rows, never [layers, T, D]
        states: list[torch.Tensor] = []

        def keep_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            embeds = kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else args[0]
            states.append(embeds[0, kept].detach().float())

        def keep_output(_module: nn.Module, _inputs: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            states.append(hidden[0, kept].detach().float())

        register_recording_attention()
        with (
            attention_implementation(self.model, RECORDING_ATTENTION),
            recording(self._layers, on_layer),
            forward_hooks((self._language_model, keep_input), pre_with_kwargs=True),
            forward_hooks(*((layer, keep_output) for layer in self._decoder_layers)),
        ):
            output = self.model(
                input_ids=sequence,
                attention_mask=torch.ones_like(sequence),
                use_cache=False,
                logits_to_keep=index,
                return_dict=True,
                **extra,
            )
        stacked = torch.stack(states)  # [hidden_layer, rows or T, D]
        names = ["embeddings", *(f"layers.{i}" for i in range(len(self._decoder_layers)))]
        return Trace(
            logits=output.logits[0],
            hidden_states=(stacked[:, index] if all_hidden else stacked).numpy(),
            hidden_layer_name=names,
            all_hidden_states=stacked.numpy() if all_hidden else None,
        )
