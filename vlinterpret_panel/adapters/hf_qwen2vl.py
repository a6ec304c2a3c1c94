"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): a decoder VLM whose image tokens follow the image's own shape.

Design target: ``Qwen/Qwen2-VL-2B-Instruct`` (and 7B). Unlike LLaVA's fixed 24x24 grid, the
processor resizes each image to multiples of 28 pixels near its own aspect ratio (between
``min_pixels`` and ``max_pixels``), cuts 14-pixel patches and merges each 2x2 block into one
language-model token: an image of H x W pixels gives about (H/28) x (W/28) tokens, a grid
read from ``image_grid_thw``. Each token's box is its 28x28 block mapped back to the user's
image. Positions use M-RoPE (rotary embeddings along time, height and width); the recorded
queries and keys are taken after it, so the recomputed maps are the model's own.

The user's text goes into Qwen2's chat form (``prompt_template``). ``forward`` explains the
first next token with eager capture; ``generate``/``trace`` explain every generated token
over SDPA (``hf_generation``). Token deletion is not supported: M-RoPE positions are computed
from the full sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from vlinterpret_panel.adapters.base import ForwardCapture
from vlinterpret_panel.adapters.hf_common import (
    CAPTURE_ATTENTION,
    PixelMap,
    check_image,
    layer_attentions,
    load_model_and_processor,
    register_capture_attention,
    stage_hidden_states,
    tapping,
    token_labels,
)
from vlinterpret_panel.adapters.hf_generation import HFGenerativeAdapter
from vlinterpret_panel.adapters.sdpa_recording import attention_implementation
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import IMAGE

QWEN2_VL_PROMPT = "<|im_start|>user\n<|vision_start|>{image}<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"


class Qwen2VLAdapter(HFGenerativeAdapter):
    """Adapter for ``Qwen2VLForConditionalGeneration`` with its ``Qwen2VLProcessor``."""

    def __init__(
        self, model: Any, processor: Any, *, prompt_template: str = QWEN2_VL_PROMPT, name: str | None = None
    ) -> None:
        if "{image}" not in prompt_template or "{text}" not in prompt_template:
            raise VLIError(f"prompt_template {prompt_template!r} needs an {{image}} and a {{text}} field")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt_template = prompt_template
        config = model.config
        self.name = name or config.name_or_path or "qwen2-vl"
        self.image_token_id = int(config.image_token_id)
        image_processor = processor.image_processor
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self._language_model = model.model.language_model
        self._decoder_layers = list(cast(nn.ModuleList, self._language_model.layers))
        self._layers = [cast(nn.Module, layer.self_attn) for layer in self._decoder_layers]
        self.layer_names = [f"model.language_model.layers.{i}.self_attn" for i in range(len(self._layers))]
        text_config = config.text_config
        self.num_heads = int(text_config.num_attention_heads)
        vocabulary = int(model.lm_head.out_features)
        self.labels = [str(t) for t in self.tokenizer.convert_ids_to_tokens(list(range(vocabulary)))]
        self.config = {
            "family": "qwen2_vl",
            "checkpoint": self.name,
            "layers": len(self._layers),
            "heads": self.num_heads,
            "hidden_size": text_config.hidden_size,
            "patch_size": self.patch_size,
            "merge_size": self.merge_size,
            "prompt_template": prompt_template,
        }

    @classmethod
    def from_pretrained(cls, name_or_path: str, **options: Any) -> Qwen2VLAdapter:
        """Load model and processor; ``prompt_template`` may be given as an option."""
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        model, processor = load_model_and_processor(
            Qwen2VLForConditionalGeneration, AutoProcessor, name_or_path, "Qwen2-VL", options
        )
        return cls(
            model,
            processor,
            prompt_template=options.get("prompt_template", QWEN2_VL_PROMPT),
            name=options.get("name", name_or_path),
        )

    def _encode(self, image: np.ndarray, text: str) -> dict[str, torch.Tensor]:
        """The processor's tensors (ids with the image's tokens, pixel patches, ``image_grid_thw``)."""
        image = check_image(image, self.name)
        prompt = self.prompt_template.format(image=self.processor.image_token, text=text)
        try:
            return dict(self.processor(images=[image], text=[prompt], return_tensors="pt"))
        except (ValueError, TypeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise VLIError(f"{self.name}: the processor rejected the image ({reason})") from None

    def _layout(
        self, ids: Sequence[int], image: np.ndarray, encoded: dict[str, torch.Tensor]
    ) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
        """Tokens (image tokens named by merged-grid cell), modality, pixel boxes and grid positions."""
        tokens, modality = token_labels(self.tokenizer, list(ids))
        is_image = np.asarray(ids) == self.image_token_id
        _, grid_height, grid_width = (int(v) for v in encoded["image_grid_thw"][0])
        rows, cols = grid_height // self.merge_size, grid_width // self.merge_size
        if int(is_image.sum()) != rows * cols:
            raise VLIError(f"{self.name}: {int(is_image.sum())} image tokens, the image grid has {rows} x {cols}")
        positions = np.full((len(tokens), 2), -1, np.int64)
        cells = np.arange(rows * cols)
        positions[is_image] = np.stack([cells // cols, cells % cols], axis=1)
        height, width = image.shape[:2]
        block = self.patch_size * self.merge_size
        pixel_map = PixelMap(width / (cols * block), height / (rows * block), 0.0, 0.0, width, height)
        boxes = pixel_map.patch_boxes(positions, block, block)
        for index in np.flatnonzero(is_image):
            modality[index] = IMAGE
            tokens[index] = f"<patch_{positions[index, 0]}_{positions[index, 1]}>"
        return tokens, modality, boxes, positions

    def forward(self, image: np.ndarray, text: str, *, keep_tokens: np.ndarray | None = None) -> ForwardCapture:
        """The prompt with every layer's attention captured (eager); explains the first next token."""
        if keep_tokens is not None:
            raise NotImplementedError(f"{self.name}: token deletion is not supported (M-RoPE positions)")
        encoded = self._encode(image, text)
        ids = encoded["input_ids"][0].tolist()
        tokens, modality, boxes, positions = self._layout(ids, image, encoded)
        register_capture_attention()
        with attention_implementation(self.model, CAPTURE_ATTENTION), tapping() as tap:
            outputs = self.model(**encoded, output_hidden_states=True, use_cache=False, return_dict=True)
        every = range(len(ids))
        return ForwardCapture(
            tokens=tokens,
            modality=modality,
            token_box=boxes,
            attentions=layer_attentions(
                tap,
                tap.calls_of(self._layers),
                0,
                None,
                name="model.language_model.layers.{layer}.self_attn",
                kind="self",
                tokens=every,
            ),
            hidden_states=stage_hidden_states(
                outputs.hidden_states, 0, None, layer_name="model.language_model.layers.{layer}", tokens=every
            ),
            output=outputs.logits[0, len(ids) - 1],
            output_labels=self.labels,
            readout_tokens={"next_token": len(ids) - 1},
            patch_position=positions.astype(np.int16),
        )
