"""CLIP (``CLIPModel``): a dual encoder. Design target: ``openai/clip-vit-base-patch32``.

The text tower (causal self-attention) and the vision tower never attend to each other, so
the token sequence is the text tokens followed by the image [CLS] and the patches; text
layers fill the ``text_self`` block and vision layers the ``image_self`` block. The output is
the image-text similarity (CLIP's scaled cosine, ``logits_per_image``) and the readouts are
the token each tower pools: the text's end-of-text token and the image [CLS]. The towers'
hidden sizes differ, so the narrower one is NaN in its trailing features.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from vlinterpret_panel.adapters.base import BatchedAdapter, ForwardCapture, HiddenCapture
from vlinterpret_panel.adapters.hf_common import (
    check_image,
    clip_style_pixel_map,
    forward_hooks,
    image_token_labels,
    keep_index,
    layer_attentions,
    load_model_and_processor,
    tapping,
    token_labels,
    use_capture_attention,
)
from vlinterpret_panel.errors import VLIError


def pooled_text_index(ids: Sequence[int], eos_token_id: int) -> int:
    """The token CLIP's text tower pools, by its own rule (the highest id for legacy configs)."""
    ids = list(ids)
    if eos_token_id == 2:  # checkpoints from before the eos id was configured: the EOS has the highest id
        return int(np.argmax(ids))
    return ids.index(eos_token_id) if eos_token_id in ids else len(ids) - 1


class ClipAdapter(BatchedAdapter):
    """Adapter for ``CLIPModel`` with its ``CLIPProcessor`` (tokenizer and image processor)."""

    def __init__(self, model: Any, processor: Any, *, name: str | None = None) -> None:
        use_capture_attention(model)
        self.model = model.eval()
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        config = model.config
        self.name = name or config.name_or_path or "clip"
        vision = config.vision_config
        self.patch_size = int(vision.patch_size)
        self.grid = int(vision.image_size) // self.patch_size
        self.config = {
            "family": "clip",
            "checkpoint": self.name,
            "text_layers": config.text_config.num_hidden_layers,
            "vision_layers": vision.num_hidden_layers,
            "text_hidden_size": config.text_config.hidden_size,
            "vision_hidden_size": vision.hidden_size,
            "patch_size": self.patch_size,
        }
        self._text_layers = [layer.self_attn for layer in model.text_model.encoder.layers]
        self._vision_layers = [layer.self_attn for layer in model.vision_model.encoder.layers]
        self._max_text = int(config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **options: Any) -> ClipAdapter:
        """Load model and processor from a Hub name or a local directory."""
        from transformers import CLIPModel, CLIPProcessor

        model, processor = load_model_and_processor(CLIPModel, CLIPProcessor, name_or_path, "CLIP", options)
        return cls(model, processor, name=options.get("name", name_or_path))

    def run_examples(
        self, images: Sequence[np.ndarray], texts: Sequence[str], keep_tokens: np.ndarray | None
    ) -> list[ForwardCapture]:
        """Run the pairs in one pass; ``keep_tokens`` deletes text tokens and patches (position ids kept)."""
        images = [check_image(image, self.name) for image in images]
        text = self._tokenize(texts)
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        input_ids, text_mask = text["input_ids"], text["attention_mask"]
        n_image = 1 + self.grid * self.grid
        position_ids = None
        kept_text = kept_image = None
        if keep_tokens is not None:
            n_text = int(text_mask[0].sum())
            kept = keep_index(keep_tokens, n_text + n_image, self.name)
            kept_text, kept_image = kept[kept < n_text], kept[kept >= n_text] - n_text
            if not len(kept_text) or not len(kept_image):
                raise VLIError(f"{self.name}: keep_tokens must keep tokens of both towers")
            input_ids, text_mask = input_ids[:, kept_text], text_mask[:, kept_text]
            position_ids = torch.as_tensor(kept_text)[None]
        with tapping() as tap, self._deleting_patches(kept_image):
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=text_mask,
                position_ids=position_ids,
                pixel_values=pixel_values,
                output_hidden_states=True,
                return_dict=True,
            )
        text_calls, vision_calls = tap.calls_of(self._text_layers), tap.calls_of(self._vision_layers)
        captures = []
        for example, image in enumerate(images):
            n_text = int(text_mask[example].sum())
            ids = input_ids[example, :n_text].tolist()
            text_tokens, text_modality = token_labels(self.tokenizer, ids)
            rows, cols = np.divmod(np.arange(self.grid * self.grid), self.grid)
            positions = np.concatenate([[[-1, -1]], np.stack([rows, cols], axis=1)])
            boxes = clip_style_pixel_map(self.image_processor, *image.shape[:2]).patch_boxes(
                positions, self.patch_size, self.patch_size
            )
            if kept_image is not None:
                positions, boxes = positions[kept_image], boxes[kept_image]
            image_tokens, image_modality = image_token_labels(positions)
            text_index = None if n_text == input_ids.shape[1] else torch.arange(n_text)
            attentions = layer_attentions(
                tap,
                text_calls,
                example,
                text_index,
                name="text_model.encoder.layers.{layer}.self_attn",
                kind="text_self",
                tokens=range(n_text),
            ) + layer_attentions(
                tap,
                vision_calls,
                example,
                None,
                name="vision_model.encoder.layers.{layer}.self_attn",
                kind="image_self",
                tokens=range(n_text, n_text + len(positions)),
            )
            text_states = outputs.text_model_output.hidden_states
            vision_states = outputs.vision_model_output.hidden_states
            captures.append(
                ForwardCapture(
                    tokens=text_tokens + image_tokens,
                    modality=text_modality + image_modality,
                    token_box=np.concatenate([np.full((n_text, 4), np.nan, np.float32), boxes]),
                    attentions=attentions,
                    hidden_states=_joint_stages(text_states, vision_states, example, n_text),
                    output=outputs.logits_per_image[example, example],
                    readout_tokens={
                        "text": pooled_text_index(ids, int(self.model.config.text_config.eos_token_id)),
                        "image": n_text + int(np.flatnonzero(positions[:, 0] < 0)[0])
                        if (positions[:, 0] < 0).any()
                        else -1,
                    },
                    patch_position=np.concatenate([np.full((n_text, 2), -1), positions]).astype(np.int16),
                    score_captions=self._caption_scorer(outputs.image_embeds[example : example + 1]),
                )
            )
        return captures

    def _tokenize(self, texts: Sequence[str]) -> Any:
        """The texts as CLIP's text tower reads them: padded, cut to its positions."""
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self._max_text, return_tensors="pt"
        )

    def _caption_scorer(self, image_embeds: torch.Tensor) -> Callable[[Sequence[str]], torch.Tensor]:
        """The scores of an image (its normalised embedding, in the graph) against other captions, as CLIP's
        ``logits_per_image``: the captions' features (``get_text_features``), normalised, times ``exp(logit_scale)``."""

        def score(captions: Sequence[str]) -> torch.Tensor:
            text = self._tokenize(captions)
            features = self.model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
            features = features if torch.is_tensor(features) else features.pooler_output  # transformers 5: an output
            text_embeds = torch.nn.functional.normalize(features, dim=-1)
            return (self.model.logit_scale.exp() * image_embeds @ text_embeds.T)[0]

        return score

    def _deleting_patches(self, kept_image: np.ndarray | None) -> contextlib.AbstractContextManager:
        """Drop image tokens right after the vision embeddings (which hold their positions)."""
        if kept_image is None:
            return contextlib.nullcontext()
        index = torch.as_tensor(kept_image)
        return forward_hooks((self.model.vision_model.embeddings, lambda _module, _inputs, output: output[:, index]))


def _joint_stages(
    text_states: Sequence[torch.Tensor], vision_states: Sequence[torch.Tensor], example: int, n_text: int
) -> list[HiddenCapture]:
    """Stage k holds both towers' k-th hidden states; the narrower tower is NaN-padded."""
    width = max(int(text_states[0].shape[-1]), int(vision_states[0].shape[-1]))

    def padded(states: torch.Tensor) -> torch.Tensor:
        missing = width - int(states.shape[-1])
        return torch.nn.functional.pad(states, (0, missing), value=float("nan")) if missing else states

    stages = []
    for stage in range(max(len(text_states), len(vision_states))):
        parts, indices = [], []
        if stage < len(text_states):
            parts.append(padded(text_states[stage][example, :n_text]))
            indices += list(range(n_text))
        if stage < len(vision_states):
            image = vision_states[stage][example]
            parts.append(padded(image))
            indices += list(range(n_text, n_text + int(image.shape[0])))
        stages.append(
            HiddenCapture(
                name="embeddings" if stage == 0 else f"encoder.layers.{stage - 1}",
                states=torch.cat(parts),
                token_indices=indices,
            )
        )
    return stages
