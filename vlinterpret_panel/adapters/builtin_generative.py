"""Adapter of the built-in generative model (``models.generative``): ``load_adapter("generative")``.

Token layout, the model's own order: ``[BOS]``, the 16 image patches (row-major, row 0 at
the top), the prompt's words, ``[SEP]``, then the generated answer. ``forward`` explains the
first next token after the prompt (as the LLaVA adapter does); ``generate`` and ``trace``
explain every generated token (``adapters.generative``). The model runs its causal mask
itself; ``trace`` recomputes each layer's maps from the queries and keys it hooks, the same
path as for a Hugging Face decoder running SDPA, and a test checks it against the model's
own probabilities.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from vlinterpret_panel.adapters.base import AttentionCapture, ForwardCapture, HiddenCapture
from vlinterpret_panel.adapters.builtin import _SoftmaxTap, model_pixels
from vlinterpret_panel.adapters.generative import Generated, GenerativeAdapter, LayerCallback, Trace
from vlinterpret_panel.adapters.hf_common import forward_hooks, keep_index
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.models import generative
from vlinterpret_panel.models.layers import MultiHeadAttention
from vlinterpret_panel.models.registry import WEIGHTS_DIR, load_builtin_model, weight_paths
from vlinterpret_panel.relevancy.answer import LayerAttention, causal_bias
from vlinterpret_panel.schema import IMAGE, SPECIAL, TEXT, ExampleRecord

NAME = "generative"


class BuiltinGenerativeAdapter(GenerativeAdapter):
    """The built-in LLaVA-like model on the shapes world: answers and descriptions, word by word."""

    def __init__(self, *, weights_dir: str | Path | None = None) -> None:
        directory = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
        self.model, config = load_builtin_model("generative", directory)
        self.name = NAME
        self.grid_size = config.image_size // config.patch_size
        self.layer_names = [f"layers.{i}.attention" for i in range(config.num_layers)]
        self.num_heads = config.num_heads
        weights_path, config_path = weight_paths(NAME, directory)
        self.config = {
            "family": "builtin",
            **asdict(config),
            "weights_sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
            "weights_metrics": json.loads(config_path.read_text()).get("metrics", {}),
        }

    # The layout of a sequence

    def _prompt_ids(self, text: str) -> list[int]:
        ids = generative.encode_prompt(text)
        limit = self.model.config.max_text_length
        if len(ids) > limit:
            raise VLIError(
                f"{self.name}: the prompt has {len(ids)} tokens with [BOS] and [SEP]; "
                f"the model's context holds {limit} text tokens"
            )
        return ids

    def _layout(self, text_ids: Sequence[int], pixel_map: Any) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
        """Tokens, modality, boxes and patch positions of ``[BOS] patches text[1:]``."""
        words = generative.token_strings(list(text_ids))
        grid = np.stack(np.divmod(np.arange(self.grid_size**2), self.grid_size), axis=1)
        tokens = [words[0], *(f"<patch_{row}_{col}>" for row, col in grid), *words[1:]]
        modality = [SPECIAL if t in generative.SPECIAL_TOKENS else TEXT for t in tokens]
        modality[1 : 1 + len(grid)] = [IMAGE] * len(grid)
        patch_position = np.full((len(tokens), 2), -1, np.int16)
        patch_position[1 : 1 + len(grid)] = grid
        token_box = np.full((len(tokens), 4), np.nan, np.float32)
        patch = self.model.config.patch_size
        token_box[1 : 1 + len(grid)] = pixel_map.patch_boxes(grid, patch, patch)
        return tokens, modality, token_box, patch_position

    # ModelAdapter: the first next token

    def forward(self, image: np.ndarray, text: str, *, keep_tokens: np.ndarray | None = None) -> ForwardCapture:
        """Run the prompt; explain the first token of the answer (its logits over the vocabulary)."""
        ids = self._prompt_ids(text)
        pixels, maps = model_pixels([image], self.model.config.image_size, self.name)
        tokens, modality, token_box, patch_position = self._layout(ids, maps[0])
        n_patches = self.grid_size**2
        layout = np.arange(len(tokens))
        text_keep = image_keep = None
        if keep_tokens is not None:
            layout = keep_index(keep_tokens, len(tokens), self.name)
            if layout[0] != 0:
                raise VLIError(f"{self.name}: keep_tokens must keep [BOS] (token 0)")
            image_keep = torch.as_tensor(layout[(layout >= 1) & (layout <= n_patches)] - 1)[None]
            text_keep = torch.as_tensor(np.concatenate([[0], layout[layout > n_patches] - n_patches]))[None]
        input_ids = torch.tensor([ids])
        with _SoftmaxTap() as tap:
            output = self.model(pixels, input_ids, torch.ones_like(input_ids, dtype=torch.bool), image_keep, text_keep)
        maps_of = [tap.per_example[id(p)][1][0] if id(p) in tap.per_example else p[0] for p in output.attentions]
        every = list(range(len(layout)))
        attentions = [
            AttentionCapture(name, "self", probabilities, every, every)
            for name, probabilities in zip(self.layer_names, maps_of, strict=True)
        ]
        hidden = [
            HiddenCapture("embeddings" if i == 0 else f"layers.{i - 1}", states[0], every)
            for i, states in enumerate(output.hidden_states)
        ]
        last = len(layout) - 1
        return ForwardCapture(
            tokens=[tokens[i] for i in layout],
            modality=[modality[i] for i in layout],
            token_box=token_box[layout],
            attentions=attentions,
            hidden_states=hidden,
            output=output.logits[0, last],
            output_labels=list(generative.VOCAB),
            readout_tokens={"next_token": last},
            patch_position=patch_position[layout],
        )

    # GenerativeAdapter: every generated token

    def token_id(self, token: str) -> int:
        """The id of a word of the model's vocabulary (``generative.VOCAB``)."""
        if token not in generative.VOCAB:
            known = [word for word in generative.VOCAB if word not in generative.SPECIAL_TOKENS]
            raise VLIError(f"{token!r} is not in {self.name}'s vocabulary; its words are e.g. {known[:12]}")
        return generative.VOCAB.index(token)

    def generate(self, image: np.ndarray, text: str, *, max_new_tokens: int, top_k: int) -> Generated:
        """Greedy answer (the model's own loop), with each step's probability and top-k alternatives."""
        if max_new_tokens < 1:
            raise VLIError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        ids = self._prompt_ids(text)
        pixels, maps = model_pixels([image], self.model.config.image_size, self.name)
        result = self.model.generate(pixels, [ids], max_new_tokens)
        answer = result.ids[0].tolist()
        steps = answer.index(generative.EOS_ID) + 1 if generative.EOS_ID in answer else len(answer)
        if steps == 0:
            limit = self.model.config.max_text_length
            raise VLIError(f"{self.name}: no room to answer: the prompt fills the model's {limit} text tokens")
        answer = answer[:steps]
        distributions = result.distributions[0, :steps]
        best = distributions.topk(min(top_k, distributions.shape[-1]), dim=-1)
        tokens, modality, token_box, patch_position = self._layout(ids + answer, maps[0])
        first = 1 + self.grid_size**2 + len(ids) - 1
        return Generated(
            tokens=tokens,
            modality=modality,
            token_box=token_box,
            answer_positions=np.arange(first, first + steps),
            answer_ids=answer,
            probabilities=result.probabilities[0, :steps].numpy(),
            alternatives=np.array([generative.token_strings(row) for row in best.indices.tolist()], dtype=object),
            alternative_probabilities=best.values.numpy(),
            text=generative.decode(answer),
            inputs=(pixels, ids + answer),
            patch_position=patch_position,
        )

    def trace(
        self, generated: Generated, on_layer: LayerCallback, *, rows: Sequence[int], all_hidden: bool = False
    ) -> Trace:
        """One pass over the whole sequence; each layer's queries, keys and values go to ``on_layer``."""
        pixels, text_ids = generated.inputs
        input_ids = torch.tensor([text_ids])
        scaling = 1 / math.sqrt(self.model.config.hidden_size // self.num_heads)
        pending: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        before_hooks: list[tuple[nn.Module, Callable[..., Any]]] = []
        after_hooks: list[tuple[nn.Module, Callable[..., Any]]] = []
        for layer, block in enumerate(cast(nn.ModuleList, self.model.layers)):
            attention = cast(MultiHeadAttention, block.attention)

            def before(module: Any, args: tuple, kwargs: dict, layer: int = layer) -> None:
                queries = args[0]
                allowed = args[3] if len(args) > 3 else kwargs.get("attention_mask")
                with torch.no_grad():
                    split = [
                        module._split_heads(projection(queries))[0]
                        for projection in (module.query, module.key, module.value)
                    ]
                pending[layer] = (*split, causal_bias(queries.shape[1], allowed))

            def after(_module: Any, inputs: tuple, _output: Any, layer: int = layer) -> None:
                query, key, value, bias = pending.pop(layer)
                on_layer(layer, LayerAttention(query, key, value, bias, scaling, output=inputs[0]))

            before_hooks.append((attention, before))
            after_hooks.append((attention.output, after))
        with forward_hooks(*before_hooks, pre_with_kwargs=True), forward_hooks(*after_hooks):
            output = self.model(pixels, input_ids, torch.ones_like(input_ids, dtype=torch.bool))
        index = torch.as_tensor(list(rows), dtype=torch.long)
        states = torch.stack([s[0] for s in output.hidden_states]).detach()
        return Trace(
            logits=output.logits[0, index],
            hidden_states=states[:, index].numpy(),
            hidden_layer_name=["embeddings", *(f"layers.{i}" for i in range(self.model.config.num_layers))],
            all_hidden_states=states.numpy() if all_hidden else None,
        )

    @torch.no_grad()
    def kept_outputs(
        self,
        image: np.ndarray,
        tokens: Sequence[str],
        position: int,
        units: np.ndarray,
        kept_sets: Sequence[np.ndarray],
        target: str,
    ) -> tuple[np.ndarray, list[str]]:
        """The token at sequence ``position`` with only ``kept_sets`` of the deletable ``units`` kept.

        ``tokens`` is the stored sequence; the model reads ``tokens[:position]`` with the units
        not kept deleted (the others keep their positions). Returns, per kept set, the
        probability of ``target`` and the most probable token. Sets keeping equally many
        patches and text tokens share a pass.
        """
        n_patches = self.grid_size**2
        deletable = set(np.asarray(units).tolist())
        always = [p for p in range(position) if p not in deletable]
        text_ids = [generative.TOKEN_TO_ID[t] for t in [tokens[0], *tokens[1 + n_patches : position]]]
        pixels, _ = model_pixels([image], self.model.config.image_size, self.name)
        layouts = []
        for kept in kept_sets:
            positions = np.union1d(always, np.asarray(kept, dtype=np.int64))
            patches = positions[(positions >= 1) & (positions <= n_patches)] - 1
            text = np.concatenate([[0], positions[positions > n_patches] - n_patches])
            layouts.append((patches, text))
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (patches, text) in enumerate(layouts):
            groups.setdefault((len(patches), len(text)), []).append(index)
        distributions = torch.zeros(len(layouts), len(generative.VOCAB))
        ids = torch.tensor([text_ids])
        for (n_image, n_text), members in groups.items():
            image_keep = torch.as_tensor(np.stack([layouts[i][0] for i in members]).reshape(len(members), n_image))
            text_keep = torch.as_tensor(np.stack([layouts[i][1] for i in members]).reshape(len(members), n_text))
            output = self.model(
                pixels.expand(len(members), -1, -1, -1),
                ids.expand(len(members), -1),
                torch.ones(len(members), len(text_ids), dtype=torch.bool),
                image_keep,
                text_keep,
            )
            distributions[members] = output.next_token_logits().softmax(dim=-1)
        winners = generative.token_strings(distributions.argmax(dim=-1).tolist())
        return distributions[:, generative.TOKEN_TO_ID[target]].numpy(), list(winners)

    @torch.no_grad()
    def deletion_probabilities(self, record: ExampleRecord, requests: Sequence[tuple[int, np.ndarray]]) -> np.ndarray:
        """Per request ``(step, kept patches)``: the probability of generated token ``step`` with only those patches.

        The model reads the prompt and the answer before the token; deleted patches leave the
        sequence, the others keep their positions. Requests keeping equally many patches share a pass.
        """
        if record.answer is None:
            raise VLIError(f"example {record.example_id!r} has no generated answer")
        n_patches = self.grid_size**2
        text_ids = [generative.TOKEN_TO_ID[t] for t in [record.tokens[0], *record.tokens[1 + n_patches :]]]
        answer_ids = [generative.TOKEN_TO_ID[t] for t in record.answer.tokens]
        positions = np.asarray(record.answer.positions)
        pixels, _ = model_pixels([record.image], self.model.config.image_size, self.name)
        result = np.zeros(len(requests))
        groups: dict[int, list[int]] = {}
        for index, (_, patches) in enumerate(requests):
            groups.setdefault(len(patches), []).append(index)
        for count, members in groups.items():
            prefixes = [text_ids[: int(positions[requests[i][0]]) - n_patches] for i in members]
            input_ids, input_mask = generative.pad_ids(prefixes)
            keep = torch.as_tensor(np.stack([np.sort(requests[i][1]) for i in members]).reshape(len(members), count))
            output = self.model(pixels.expand(len(members), -1, -1, -1), input_ids, input_mask, image_keep=keep)
            probabilities = output.next_token_logits().softmax(dim=-1)
            wanted = torch.as_tensor([answer_ids[requests[i][0]] for i in members])
            result[members] = probabilities[torch.arange(len(members)), wanted].numpy()
        return result
