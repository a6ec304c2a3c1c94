"""Dual-encoder (CLIP-like) model: separate text and image transformers, contrastive scores."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vlinterpret_panel.models.layers import (
    AttentionMap,
    BaseVLModel,
    KeptTokens,
    ModelConfig,
    VLModelOutput,
    init_weights,
    run_self_attention_stack,
    self_attention_stack,
)


class DualEncoderModel(BaseVLModel):
    """Image [CLS] + patches and text tokens encoded separately, compared by cosine similarity.

    The text is pooled at its ``[CLS]`` token (index 0), the image at its own learned
    ``[CLS]`` token prepended to the patches. Both are projected, L2-normalised and multiplied
    by a learnable temperature ``exp(logit_scale)``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.image_cls = nn.Parameter(torch.randn(hidden) * 0.02)
        self.text_layers = self_attention_stack(config, config.num_layers)
        self.image_layers = self_attention_stack(config, config.num_layers)
        self.text_norm = nn.LayerNorm(hidden)
        self.image_norm = nn.LayerNorm(hidden)
        self.text_projection = nn.Linear(hidden, config.projection_size, bias=False)
        self.image_projection = nn.Linear(hidden, config.projection_size, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

        self.apply(init_weights)

    def encode_text(
        self, text_ids: Tensor, text_mask: Tensor, positions: Tensor
    ) -> tuple[Tensor, list[Tensor], list[AttentionMap]]:
        """Normalised text embeddings pooled at [CLS], hidden states and attention maps.

        ``text_ids``/``text_mask``/``positions`` are the kept tokens (``[CLS]`` first) and
        their original positions, all ``[B, K]``.
        """
        text = self.text_embedding(text_ids, positions)
        text, states, attentions = run_self_attention_stack(
            self.text_layers, text, text_mask, name="text_layers", kind="text_self", stream="text"
        )
        embeds = nn.functional.normalize(self.text_projection(self.text_norm(text[:, 0])), dim=-1)
        return embeds, states, attentions

    def encode_image(self, pixels: Tensor, positions: Tensor) -> tuple[Tensor, list[Tensor], list[AttentionMap]]:
        """Normalised image embeddings pooled at the image [CLS], hidden states and attention.

        ``positions`` ``[B, K]`` are the kept patch indices; the stream is ``[CLS] patches``.
        """
        patches = self.patch_embedding(pixels, positions)
        image = torch.cat([self.image_cls.expand(patches.shape[0], 1, -1), patches], dim=1)
        image, states, attentions = run_self_attention_stack(
            self.image_layers, image, None, name="image_layers", kind="image_self", stream="image"
        )
        pooled = self.image_norm(image[:, 0])
        embeds = nn.functional.normalize(self.image_projection(pooled), dim=-1)
        return embeds, states, attentions

    def caption_similarity(self, image_embeds: Tensor, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Similarities ``[B_images, B_texts]`` of already encoded images with whole captions ``[B_texts, T]``.

        A caption contrast (``relevancy.targets``) scores the example's image, still in the autograd graph,
        against a second caption without running the image tower again."""
        positions = torch.arange(text_ids.shape[1], device=text_ids.device).expand_as(text_ids)
        text_embeds, _, _ = self.encode_text(text_ids, text_mask.bool(), positions)
        return self.similarity(image_embeds, text_embeds)

    def similarity(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """Temperature-scaled cosine similarities ``[B_images, B_texts]``."""
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        return scale * image_embeds @ text_embeds.T

    def forward_tokens(self, kept: KeptTokens, pixels: Tensor) -> VLModelOutput:
        """Similarities ``[B_images, B_texts]`` between the kept caption tokens and the kept patches.

        ``forward``'s ``image_keep`` indexes patches only; the image ``[CLS]`` is always kept at
        index 0 of the image stream.
        """
        text_embeds, text_states, text_maps = self.encode_text(kept.text_ids, kept.text_mask, kept.text_positions)
        image_embeds, image_states, image_maps = self.encode_image(pixels, kept.image_positions)
        return VLModelOutput.from_kept(
            kept,
            self.similarity(image_embeds, text_embeds),
            text_maps + image_maps,
            {"text": text_states, "image": image_states},
            stream_layout={"text": ("text",), "image": ("image_cls", "image")},
            text_embeds=text_embeds,
            image_embeds=image_embeds,
        )
