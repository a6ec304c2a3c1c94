"""Dual-encoder (CLIP-like) model: separate text and image transformers, contrastive scores."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vlinterpret_panel.models.layers import (
    AttentionMap,
    BaseVLModel,
    ModelConfig,
    PatchEmbedding,
    SelfAttentionBlock,
    TextEmbedding,
    VLModelOutput,
    init_weights,
)


class DualEncoderModel(BaseVLModel):
    """Image [CLS] + patches and text tokens encoded separately, compared by cosine similarity.

    The text is pooled at its ``[CLS]`` token (index 0), the image at its own learned
    ``[CLS]`` token prepended to the patches. Both are projected, L2-normalised and multiplied
    by a learnable temperature ``exp(logit_scale)``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        hidden, heads, inner = config.hidden_size, config.num_heads, config.intermediate_size
        self.text_embedding = TextEmbedding(config.vocab_size, config.max_text_length, hidden)
        self.patch_embedding = PatchEmbedding(config.image_size, config.patch_size, hidden)
        self.image_cls = nn.Parameter(torch.randn(hidden) * 0.02)
        self.text_layers = nn.ModuleList(SelfAttentionBlock(hidden, heads, inner) for _ in range(config.num_layers))
        self.image_layers = nn.ModuleList(SelfAttentionBlock(hidden, heads, inner) for _ in range(config.num_layers))
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
        states, attentions = [text], []
        for index, layer in enumerate(self.text_layers):
            text, probs = layer(text, text_mask)
            states.append(text)
            attentions.append(AttentionMap(f"text_layers.{index}.attention", "text_self", index, "text", "text", probs))
        embeds = nn.functional.normalize(self.text_projection(self.text_norm(text[:, 0])), dim=-1)
        return embeds, states, attentions

    def encode_image(self, pixels: Tensor, positions: Tensor) -> tuple[Tensor, list[Tensor], list[AttentionMap]]:
        """Normalised image embeddings pooled at the image [CLS], hidden states and attention.

        ``positions`` ``[B, K]`` are the kept patch indices; the stream is ``[CLS] patches``.
        """
        patches = self.patch_embedding(pixels, positions)
        image = torch.cat([self.image_cls.expand(patches.shape[0], 1, -1), patches], dim=1)
        states, attentions = [image], []
        for index, layer in enumerate(self.image_layers):
            image, probs = layer(image)
            states.append(image)
            attentions.append(
                AttentionMap(f"image_layers.{index}.attention", "image_self", index, "image", "image", probs)
            )
        pooled = self.image_norm(image[:, 0])
        embeds = nn.functional.normalize(self.image_projection(pooled), dim=-1)
        return embeds, states, attentions

    def similarity(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """Temperature-scaled cosine similarities ``[B_images, B_texts]``."""
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        return scale * image_embeds @ text_embeds.T

    def forward(
        self,
        text_ids: Tensor,
        text_mask: Tensor,
        pixels: Tensor,
        text_keep: Tensor | None = None,
        image_keep: Tensor | None = None,
    ) -> VLModelOutput:
        """Similarities ``[B_images, B_texts]`` for caption ids ``[B, T]``, pixels ``[B, 3, H, W]``.

        ``image_keep`` indexes patches only; the image ``[CLS]`` is always kept at index 0 of
        the image stream.
        """
        kept = self.select_tokens(text_ids, text_mask, pixels, text_keep, image_keep)
        text_embeds, text_states, text_maps = self.encode_text(kept.text_ids, kept.text_mask, kept.text_positions)
        image_embeds, image_states, image_maps = self.encode_image(pixels, kept.image_positions)
        return VLModelOutput(
            logits=self.similarity(image_embeds, text_embeds),
            attentions=text_maps + image_maps,
            hidden_states={"text": text_states, "image": image_states},
            text_positions=kept.text_positions,
            image_positions=kept.image_positions,
            text_mask=kept.text_mask,
            stream_layout={"text": ("text",), "image": ("image_cls", "image")},
            text_embeds=text_embeds,
            image_embeds=image_embeds,
        )
