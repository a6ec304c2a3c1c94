"""LLaVA (``LlavaForConditionalGeneration``): a decoder whose image tokens sit inside the text
sequence. Design target: ``llava-hf/llava-1.5-7b-hf``.

The user's text is put into a prompt (``prompt_template``, LLaVA-1.5's chat form by
default) whose image placeholder the processor expands to one token per patch feature. The
stored layers are the language model's causal self-attention layers (``self``) over the
whole sequence; the vision tower's own attention (over its 577 CLIP tokens, not the
sequence) is not stored. The explained output is the logit of the next token after the
prompt, its labels the vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from vlinterpret_panel.adapters.base import BatchedAdapter, ForwardCapture
from vlinterpret_panel.adapters.hf_common import (
    check_image,
    clip_style_pixel_map,
    forward_hooks,
    keep_index,
    layer_attentions,
    load_model_and_processor,
    stage_hidden_states,
    tapping,
    token_labels,
    use_capture_attention,
)
from vlinterpret_panel.adapters.hf_generation import HFGenerativeAdapter
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import IMAGE

LLAVA_15_PROMPT = "USER: {image}\n{text} ASSISTANT:"


class LlavaAdapter(BatchedAdapter, HFGenerativeAdapter):
    """Adapter for ``LlavaForConditionalGeneration`` with its ``LlavaProcessor``: the first next token, or
    every token of a generated answer (``generate``/``trace``, over SDPA)."""

    def __init__(
        self, model: Any, processor: Any, *, prompt_template: str = LLAVA_15_PROMPT, name: str | None = None
    ) -> None:
        if "{image}" not in prompt_template or "{text}" not in prompt_template:
            raise VLIError(f"prompt_template {prompt_template!r} needs an {{image}} and a {{text}} field")
        use_capture_attention(model)
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Right padding keeps every example's positions 0..n-1, as when it runs alone.
        self.tokenizer.padding_side = "right"
        self.prompt_template = prompt_template
        config = model.config
        self.name = name or config.name_or_path or "llava"
        vision = config.vision_config
        self.patch_size = int(vision.patch_size)
        self.grid = int(vision.image_size) // self.patch_size
        self.with_image_cls = config.vision_feature_select_strategy != "default"
        self.image_token_id = int(config.image_token_id)
        self._language_model = model.model.language_model
        self._decoder_layers = list(cast(nn.ModuleList, self._language_model.layers))
        self._layers = [cast(nn.Module, layer.self_attn) for layer in self._decoder_layers]
        self.layer_names = [f"model.language_model.layers.{i}.self_attn" for i in range(len(self._layers))]
        self.num_heads = int(config.text_config.num_attention_heads)
        vocabulary = int(model.lm_head.out_features)
        self.labels = [str(t) for t in self.tokenizer.convert_ids_to_tokens(list(range(vocabulary)))]
        self.config = {
            "family": "llava",
            "checkpoint": self.name,
            "layers": len(self._layers),
            "heads": config.text_config.num_attention_heads,
            "hidden_size": config.text_config.hidden_size,
            "patch_size": self.patch_size,
            "prompt_template": prompt_template,
        }

    @classmethod
    def from_pretrained(cls, name_or_path: str, **options: Any) -> LlavaAdapter:
        """Load model and processor; ``prompt_template`` may be given as an option."""
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model, processor = load_model_and_processor(
            LlavaForConditionalGeneration, AutoProcessor, name_or_path, "LLaVA", options
        )
        return cls(
            model,
            processor,
            prompt_template=options.get("prompt_template", LLAVA_15_PROMPT),
            name=options.get("name", name_or_path),
        )

    def run_examples(
        self, images: Sequence[np.ndarray], texts: Sequence[str], keep_tokens: np.ndarray | None
    ) -> list[ForwardCapture]:
        """Run the pairs in one pass; ``keep_tokens`` deletes tokens after embedding."""
        images = [check_image(image, self.name) for image in images]
        prompts = [self.prompt_template.format(image=self.processor.image_token, text=t) for t in texts]
        encoded = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        input_ids, mask = encoded["input_ids"], encoded["attention_mask"]
        kept = None
        if keep_tokens is not None:
            kept = keep_index(keep_tokens, int(mask[0].sum()), self.name)
        with tapping() as tap, self._deleting(kept):
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                pixel_values=encoded["pixel_values"],
                output_hidden_states=True,
                use_cache=False,
                return_dict=True,
            )
        calls = tap.calls_of(self._layers)
        captures = []
        for example, image in enumerate(images):
            n_tokens = int(mask[example].sum())
            tokens, modality, boxes, positions = self._layout(input_ids[example, :n_tokens].tolist(), image)
            layout = np.arange(n_tokens)
            if kept is not None:
                tokens, modality = [tokens[i] for i in kept], [modality[i] for i in kept]
                positions, boxes, layout = positions[kept], boxes[kept], np.arange(len(kept))
            sequence_length = int(outputs.logits.shape[1])
            kept_positions = None if len(layout) == sequence_length else torch.as_tensor(layout)
            every = range(len(layout))
            last = len(layout) - 1
            captures.append(
                ForwardCapture(
                    tokens=tokens,
                    modality=modality,
                    token_box=boxes,
                    attentions=layer_attentions(
                        tap,
                        calls,
                        example,
                        kept_positions,
                        name="model.language_model.layers.{layer}.self_attn",
                        kind="self",
                        tokens=every,
                    ),
                    hidden_states=stage_hidden_states(
                        outputs.hidden_states,
                        example,
                        kept_positions,
                        layer_name="model.language_model.layers.{layer}",
                        tokens=every,
                    ),
                    output=outputs.logits[example, last],
                    output_labels=self.labels,
                    readout_tokens={"next_token": last},
                    patch_position=positions.astype(np.int16),
                )
            )
        return captures

    def _encode(self, image: np.ndarray, text: str) -> dict[str, torch.Tensor]:
        """The processor's tensors for one image and the prompt built from ``text``."""
        image = check_image(image, self.name)
        prompt = self.prompt_template.format(image=self.processor.image_token, text=text)
        return dict(self.processor(images=[image], text=[prompt], return_tensors="pt"))

    def _layout(
        self, ids: Sequence[int], image: np.ndarray, encoded: Any = None
    ) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
        """Tokens (patches named by grid cell), modality, pixel boxes and patch positions of a sequence."""
        tokens, modality = token_labels(self.tokenizer, list(ids))
        is_image = np.asarray(ids) == self.image_token_id
        positions = np.full((len(tokens), 2), -1, np.int64)
        n_patches = int(is_image.sum())
        offset = 1 if self.with_image_cls else 0
        expected = self.grid * self.grid + offset
        if n_patches % expected:
            raise VLIError(f"{self.name}: {n_patches} image tokens, expected a multiple of {expected}")
        patch = np.arange(n_patches) % expected - offset
        positions[is_image] = np.stack([patch // self.grid, patch % self.grid], axis=1)
        positions[np.flatnonzero(is_image)[patch < 0]] = -1
        boxes = clip_style_pixel_map(self.processor.image_processor, *image.shape[:2]).patch_boxes(
            positions, self.patch_size, self.patch_size
        )
        for index in np.flatnonzero(is_image):
            modality[index] = IMAGE
            if positions[index, 0] >= 0:
                tokens[index] = f"<patch_{positions[index, 0]}_{positions[index, 1]}>"
        return tokens, modality, boxes, positions

    def _deleting(self, kept: np.ndarray | None) -> contextlib.AbstractContextManager:
        """Delete tokens from the language model's input embeddings, passing their original positions."""
        if kept is None:
            return contextlib.nullcontext()
        index = torch.as_tensor(kept)

        def hook(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            kwargs["inputs_embeds"] = kwargs["inputs_embeds"][:, index]
            if kwargs.get("attention_mask") is not None:
                kwargs["attention_mask"] = kwargs["attention_mask"][:, index]
            kwargs["position_ids"] = index[None]
            return args, kwargs

        return forward_hooks((self.model.model.language_model, hook), pre_with_kwargs=True)
