"""LXMERT (``LxmertForQuestionAnswering``): a dual-stream model over text tokens and image
regions. Design target: ``unc-nlp/lxmert-vqa-uncased``.

LXMERT reads region features from an object detector (Faster R-CNN in the original work),
which is not part of the checkpoint: the user supplies ``regions``, a function from the
image to ``(features [n, visual_feat_dim], boxes [n, 4])`` with boxes ``(x0, y0, x1, y1)``
normalised to [0, 1]; ``token_box`` is those boxes times the image size.

Execution order and layer kinds: language self layers (``text_self``), relational layers
over the regions (``image_self``), then per cross layer: the one cross-attention module
called twice (text queries on regions: ``cross_text_to_image``; regions on text:
``cross_image_to_text``, each call captured), then its text and region self-attention.
transformers returns only some of these maps; the adapter taps every attention module.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlinterpret_panel.adapters.base import AttentionCapture, BatchedAdapter, ForwardCapture, HiddenCapture
from vlinterpret_panel.adapters.hf_common import (
    AttentionTap,
    check_image,
    forward_hooks,
    keep_index,
    load_model_and_processor,
    tapping,
)
from vlinterpret_panel.adapters.hf_common import token_labels as text_labels
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import IMAGE

RegionFunction = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _resolve_regions(regions: RegionFunction | str | None) -> RegionFunction:
    """A region function, or ``package.module:function`` naming one."""
    if regions is None:
        raise VLIError(
            "LXMERT needs region features: pass regions=<function image -> (features, boxes)> "
            "(e.g. --option regions=package.module:function)"
        )
    if callable(regions):
        return regions
    module_name, _, attribute = str(regions).partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError):
        raise VLIError(f"regions={regions!r}: cannot import it; write package.module:function") from None


def _answers(answers: Sequence[str] | str | None, config: Any) -> list[str]:
    """Answer names: given, read from a JSON list, from the config, or ``answer_<i>``."""
    count = int(config.num_qa_labels)
    if isinstance(answers, str):
        try:
            answers = json.loads(Path(answers).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise VLIError(f"answers={answers}: cannot read a JSON list of answers ({error})") from None
    if answers is None:
        id2label = getattr(config, "id2label", None) or {}
        answers = [id2label[i] for i in range(count)] if len(id2label) == count else None
    if answers is None:
        return [f"answer_{i}" for i in range(count)]
    if len(answers) != count:
        raise VLIError(f"answers: {len(answers)} names for the model's {count} answers")
    return [str(a) for a in answers]


class LxmertAdapter(BatchedAdapter):
    """Adapter for ``LxmertForQuestionAnswering``, its tokenizer and a region function."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        regions: RegionFunction | str | None,
        answers: Sequence[str] | str | None = None,
        name: str | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.regions = _resolve_regions(regions)
        config = model.config
        self.name = name or config.name_or_path or "lxmert"
        self.labels = _answers(answers, config)
        self.config = {
            "family": "lxmert",
            "checkpoint": self.name,
            "language_layers": config.l_layers,
            "relational_layers": config.r_layers,
            "cross_layers": config.x_layers,
            "heads": config.num_attention_heads,
            "regions": getattr(self.regions, "__qualname__", str(self.regions)),
        }
        encoder = model.lxmert.encoder
        # Each attention module's dropout sees its post-softmax probabilities: the tap points.
        self._language = [layer.attention.self.dropout for layer in encoder.layer]
        self._relational = [layer.attention.self.dropout for layer in encoder.r_layers]
        self._cross = [layer.visual_attention.att.dropout for layer in encoder.x_layers]
        self._cross_text = [layer.lang_self_att.self.dropout for layer in encoder.x_layers]
        self._cross_image = [layer.visn_self_att.self.dropout for layer in encoder.x_layers]
        self._dropouts = self._language + self._relational + self._cross + self._cross_text + self._cross_image
        self._max_text = min(config.max_position_embeddings, int(getattr(tokenizer, "model_max_length", 10**6)))

    @classmethod
    def from_pretrained(cls, name_or_path: str, **options: Any) -> LxmertAdapter:
        """Load model and tokenizer; ``regions`` (required) and ``answers`` are passed on."""
        from transformers import AutoTokenizer, LxmertForQuestionAnswering

        model, tokenizer = load_model_and_processor(
            LxmertForQuestionAnswering, AutoTokenizer, name_or_path, "LXMERT", options, "tokenizer"
        )
        return cls(
            model,
            tokenizer,
            regions=options.get("regions"),
            answers=options.get("answers"),
            name=options.get("name", name_or_path),
        )

    def _region_inputs(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features, boxes = self.regions(image)
        features, boxes = np.asarray(features, np.float32), np.asarray(boxes, np.float32)
        width = int(self.model.config.visual_feat_dim)
        if features.ndim != 2 or features.shape[1] != width or boxes.shape != (len(features), 4) or not len(boxes):
            raise VLIError(
                f"{self.name}: regions must return features (n, {width}) and normalised boxes (n, 4), "
                f"got {features.shape} and {boxes.shape}"
            )
        return features, boxes

    def run_examples(
        self, images: Sequence[np.ndarray], texts: Sequence[str], keep_tokens: np.ndarray | None
    ) -> list[ForwardCapture]:
        """Run the pairs in one pass; ``keep_tokens`` deletes text tokens (positions kept) and regions."""
        images = [check_image(image, self.name) for image in images]
        regions = [self._region_inputs(image) for image in images]
        encoded = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self._max_text, return_tensors="pt"
        )
        n_regions = max(len(f) for f, _ in regions)
        features = torch.zeros(len(images), n_regions, int(self.model.config.visual_feat_dim))
        positions = torch.zeros(len(images), n_regions, 4)
        region_mask = torch.zeros(len(images), n_regions, dtype=torch.long)
        for example, (feats, boxes) in enumerate(regions):
            features[example, : len(feats)] = torch.from_numpy(feats)
            positions[example, : len(feats)] = torch.from_numpy(boxes)
            region_mask[example, : len(feats)] = 1
        text_mask = encoded["attention_mask"]
        kept_text = None
        if keep_tokens is not None:
            n_text = int(text_mask.shape[1])
            kept = keep_index(keep_tokens, n_text + n_regions, self.name)
            kept_text, kept_regions = kept[kept < n_text], kept[kept >= n_text] - n_text
            if not len(kept_text) or not len(kept_regions):
                raise VLIError(f"{self.name}: keep_tokens must keep tokens of both streams")
            text_mask = text_mask[:, kept_text]
            features, positions = features[:, kept_regions], positions[:, kept_regions]
            region_mask = region_mask[:, kept_regions]
            regions = [(f[kept_regions], b[kept_regions]) for f, b in regions]
        region_ids = kept_regions if keep_tokens is not None else np.arange(n_regions)
        embeddings: dict[str, torch.Tensor] = {}
        with tapping(self._dropouts) as tap, self._embedding_hooks(kept_text, embeddings):
            outputs = self.model(
                input_ids=encoded["input_ids"],
                attention_mask=text_mask,
                token_type_ids=encoded.get("token_type_ids"),
                visual_feats=features,
                visual_pos=positions,
                visual_attention_mask=region_mask,
                output_hidden_states=True,
                return_dict=True,
            )
        captures = []
        for example, image in enumerate(images):
            ids = encoded["input_ids"][example]
            ids = (ids[kept_text] if kept_text is not None else ids)[text_mask[example].bool()].tolist()
            box = regions[example][1] * np.array([image.shape[1], image.shape[0]] * 2, np.float32)
            names = [f"<region_{i}>" for i in region_ids[: len(box)]]
            captures.append(
                self._capture(
                    outputs, tap, embeddings, example, ids, box, names, (text_mask.shape[1], features.shape[1])
                )
            )
        return captures

    def _embedding_hooks(
        self, kept_text: np.ndarray | None, store: dict[str, torch.Tensor]
    ) -> contextlib.AbstractContextManager:
        """Record the text and region embeddings; delete text tokens after embedding if asked."""
        lxmert = self.model.lxmert
        index = None if kept_text is None else torch.as_tensor(kept_text)

        def text_hook(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            output = output if index is None else output[:, index]
            store["text"] = output
            return output

        def region_hook(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
            store["image"] = output

        return forward_hooks((lxmert.embeddings, text_hook), (lxmert.encoder.visn_fc, region_hook))

    def _capture(
        self,
        outputs: Any,
        tap: AttentionTap,
        embeddings: dict[str, torch.Tensor],
        example: int,
        ids: list[int],
        boxes: np.ndarray,
        region_names: list[str],
        padded_lengths: tuple[int, int],
    ) -> ForwardCapture:
        """One example's capture out of the padded batch: text tokens, then regions."""
        n_text, n_regions = len(ids), len(boxes)
        text_length, region_length = padded_lengths
        text_at, image_at = range(n_text), range(n_text, n_text + n_regions)

        def block(call: int, queries: int, keys: int, query_length: int, key_length: int) -> torch.Tensor:
            maps = tap.calls[call][example]
            if (queries, keys) == (query_length, key_length):
                return maps  # graph-connected: gradients flow
            return maps[:, :queries, :keys]

        def modules(calls: list[int], kind: str, name: str) -> list[AttentionCapture]:
            shapes = {
                "text_self": (n_text, n_text, text_length, text_length, text_at, text_at),
                "image_self": (n_regions, n_regions, region_length, region_length, image_at, image_at),
                "cross_text_to_image": (n_text, n_regions, text_length, region_length, text_at, image_at),
                "cross_image_to_text": (n_regions, n_text, region_length, text_length, image_at, text_at),
            }
            q, k, ql, kl, query_tokens, key_tokens = shapes[kind]
            return [
                AttentionCapture(name.format(i), kind, block(call, q, k, ql, kl), query_tokens, key_tokens)
                for i, call in enumerate(calls)
            ]

        cross_calls = tap.calls_of(self._cross)
        attentions = modules(tap.calls_of(self._language), "text_self", "lxmert.encoder.layer.{}")
        attentions += modules(tap.calls_of(self._relational), "image_self", "lxmert.encoder.r_layers.{}")
        cross_text = tap.calls_of(self._cross_text)
        cross_image = tap.calls_of(self._cross_image)
        for layer in range(len(self._cross)):
            name = f"lxmert.encoder.x_layers.{layer}"
            attentions += modules([cross_calls[2 * layer]], "cross_text_to_image", name + ".visual_attention(text)")
            attentions += modules(
                [cross_calls[2 * layer + 1]], "cross_image_to_text", name + ".visual_attention(image)"
            )
            attentions += modules([cross_text[layer]], "text_self", name + ".lang_self_att")
            attentions += modules([cross_image[layer]], "image_self", name + ".visn_self_att")

        language = outputs.language_hidden_states
        vision = outputs.vision_hidden_states
        l_layers, r_layers = len(self._language), len(self._relational)
        stages = [
            HiddenCapture(
                "embeddings",
                torch.cat([embeddings["text"][example, :n_text], embeddings["image"][example, :n_regions]]),
                list(text_at) + list(image_at),
            )
        ]
        stages += [
            HiddenCapture(f"lxmert.encoder.layer.{i}", language[i][example, :n_text], text_at) for i in range(l_layers)
        ]
        stages += [
            HiddenCapture(f"lxmert.encoder.r_layers.{i}", vision[i][example, :n_regions], image_at)
            for i in range(r_layers)
        ]
        for i in range(len(self._cross)):
            states = torch.cat([language[l_layers + i][example, :n_text], vision[r_layers + i][example, :n_regions]])
            stages.append(HiddenCapture(f"lxmert.encoder.x_layers.{i}", states, list(text_at) + list(image_at)))
        tokens, modality = text_labels(self.tokenizer, ids)
        return ForwardCapture(
            tokens=tokens + region_names,
            modality=modality + [IMAGE] * n_regions,
            token_box=np.concatenate([np.full((n_text, 4), np.nan, np.float32), boxes]),
            attentions=attentions,
            hidden_states=stages,
            output=outputs.question_answering_score[example],
            output_labels=self.labels,
            readout_tokens={"answer": 0},
        )
