"""ViLT (``ViltForQuestionAnswering``): a single-stream encoder over text tokens, an image
[CLS] and image patches. Design target: ``dandelin/vilt-b32-finetuned-vqa``.

ViLT's processor resizes the image (shorter side to 384, a multiple of 32) and pads a batch
to a common size; the model then keeps the patches inside the pixel mask, in an order it
draws at random. This adapter embeds the patches itself with the model's own
``visual_embed`` (seeded), sorts them back to row-major order (attention does not depend on
token order: positions are in the embeddings) and maps each patch to pixels of the user's
image by undoing the resize, so ``token_box`` is exact whatever the image size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vlinterpret_panel.adapters.base import BatchedAdapter, ForwardCapture
from vlinterpret_panel.adapters.hf_common import (
    PixelMap,
    check_image,
    forward_hooks,
    image_token_labels,
    keep_index,
    layer_attentions,
    load_model_and_processor,
    stage_hidden_states,
    tapping,
    token_labels,
)


class ViltAdapter(BatchedAdapter):
    """Adapter for ``ViltForQuestionAnswering`` with its ``ViltProcessor``."""

    def __init__(self, model: Any, processor: Any, *, name: str | None = None) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        config = model.config
        self.name = name or config.name_or_path or "vilt"
        self.labels = [str(config.id2label[i]) for i in range(config.num_labels)]
        self.config = {
            "family": "vilt",
            "checkpoint": self.name,
            "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads,
            "hidden_size": config.hidden_size,
            "patch_size": config.patch_size,
        }
        self._dropouts = [layer.attention.attention.dropout for layer in model.vilt.encoder.layer]
        self._max_text = min(config.max_position_embeddings, int(getattr(self.tokenizer, "model_max_length", 10**6)))

    @classmethod
    def from_pretrained(cls, name_or_path: str, **options: Any) -> ViltAdapter:
        """Load model and processor from a Hub name or a local directory."""
        from transformers import ViltForQuestionAnswering, ViltProcessor

        model, processor = load_model_and_processor(
            ViltForQuestionAnswering, ViltProcessor, name_or_path, "ViLT", options
        )
        return cls(model, processor, name=options.get("name", name_or_path))

    def _embed_images(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Image [CLS] + patch embeddings, valid patches first in row-major order."""
        embeddings = self.model.vilt.embeddings
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # ViLT samples padding patches (and patches beyond max_image_length)
            image_embeds, image_mask, (patch_index, _) = embeddings.visual_embed(
                pixel_values, pixel_mask, max_image_length=self.model.config.max_image_length
            )
        grid_width = int(pixel_values.shape[-1]) // int(self.model.config.patch_size)
        valid = image_mask[:, 1:].bool()
        raster = patch_index[..., 0] * grid_width + patch_index[..., 1]
        order = torch.argsort(torch.where(valid, raster, raster + 10**9), dim=1)
        full_order = torch.cat([torch.zeros_like(order[:, :1]), order + 1], dim=1)
        image_embeds = image_embeds.gather(1, full_order[..., None].expand(-1, -1, image_embeds.shape[-1]))
        image_mask = image_mask.gather(1, full_order)
        patch_index = patch_index.gather(1, order[..., None].expand(-1, -1, 2))
        return image_embeds, image_mask, patch_index

    def run_examples(
        self, images: Sequence[np.ndarray], texts: Sequence[str], keep_tokens: np.ndarray | None
    ) -> list[ForwardCapture]:
        """Run the pairs in one pass; ``keep_tokens`` deletes tokens, the others keep their positions."""
        images = [check_image(image, self.name) for image in images]
        encoded = self.processor(
            images=images,
            text=list(texts),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self._max_text,
        )
        image_embeds, image_mask, patch_index = self._embed_images(encoded["pixel_values"], encoded["pixel_mask"])
        text_mask = encoded["attention_mask"]
        text_length = int(text_mask.shape[1])
        kept = None
        if keep_tokens is not None:
            kept = keep_index(keep_tokens, text_length + int(image_mask.shape[1]), self.name)
        with tapping(self._dropouts) as tap, self._deleting(kept):
            outputs = self.model(
                input_ids=encoded["input_ids"],
                attention_mask=text_mask,
                token_type_ids=encoded.get("token_type_ids"),
                image_embeds=image_embeds,
                pixel_mask=image_mask,
                output_hidden_states=True,
                return_dict=True,
            )
        captures = []
        for example, image in enumerate(images):
            n_text = int(text_mask[example].sum())
            n_image = int(image_mask[example].sum())
            layout = np.concatenate([np.arange(n_text), text_length + np.arange(n_image)])
            ids = encoded["input_ids"][example, :n_text].tolist()
            positions = np.concatenate([[[-1, -1]], patch_index[example, : n_image - 1].numpy()])
            valid_pixels = encoded["pixel_mask"][example].bool()
            pixel_map = PixelMap(
                scale_x=image.shape[1] / int(valid_pixels.any(0).sum()),
                scale_y=image.shape[0] / int(valid_pixels.any(1).sum()),
                offset_x=0.0,
                offset_y=0.0,
                width=image.shape[1],
                height=image.shape[0],
            )
            captures.append(self._capture(outputs, tap, example, layout, kept, ids, positions, pixel_map))
        return captures

    def _deleting(self, kept: np.ndarray | None) -> contextlib.AbstractContextManager:
        """Drop the not-kept tokens right after embedding, so the kept ones keep their positions."""
        if kept is None:
            return contextlib.nullcontext()
        index = torch.as_tensor(kept)
        return forward_hooks(
            (self.model.vilt.embeddings, lambda _module, _inputs, output: (output[0][:, index], output[1][:, index]))
        )

    def _capture(
        self,
        outputs: Any,
        tap: Any,
        example: int,
        layout: np.ndarray,
        kept: np.ndarray | None,
        ids: list[int],
        positions: np.ndarray,
        pixel_map: PixelMap,
    ) -> ForwardCapture:
        """One example's capture: its real tokens out of the padded batch (or the kept ones)."""
        text_tokens, text_modality = token_labels(self.tokenizer, ids)
        image_tokens, image_modality = image_token_labels(positions)
        tokens = np.array(text_tokens + image_tokens, dtype=object)
        modality = np.array(text_modality + image_modality, dtype=object)
        patch_position = np.concatenate([np.full((len(ids), 2), -1), positions]).astype(np.int16)
        boxes = np.concatenate(
            [
                np.full((len(ids), 4), np.nan, np.float32),
                pixel_map.patch_boxes(positions, self.model.config.patch_size, self.model.config.patch_size),
            ]
        )
        sequence_length = int(outputs.hidden_states[0].shape[1])
        if kept is not None:
            tokens, modality, patch_position, boxes = tokens[kept], modality[kept], patch_position[kept], boxes[kept]
            layout = np.arange(len(kept))
        index = None if np.array_equal(layout, np.arange(sequence_length)) else torch.as_tensor(layout)
        every = range(len(tokens))
        return ForwardCapture(
            tokens=tokens.tolist(),
            modality=modality.tolist(),
            token_box=boxes,
            attentions=layer_attentions(
                tap,
                range(len(tap.calls)),
                example,
                index,
                name="vilt.encoder.layer.{layer}.attention",
                kind="self",
                tokens=every,
            ),
            hidden_states=stage_hidden_states(
                outputs.hidden_states, example, index, layer_name="vilt.encoder.layer.{layer}", tokens=every
            ),
            output=outputs.logits[example],
            output_labels=self.labels,
            readout_tokens={"answer": 0},
            patch_position=patch_position,
        )
