"""Single-stream (ViLT-like) VQA model: one transformer over ``[CLS] text [SEP] patches``."""

from __future__ import annotations

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


class SingleStreamModel(BaseVLModel):
    """Text and image tokens share every self-attention layer; the answer is read at [CLS].

    The joint sequence is the kept text tokens (``[CLS]`` first) followed by the kept patches;
    a learned type embedding tells the two modalities apart.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.text_embedding = TextEmbedding(config.vocab_size, config.max_text_length, hidden)
        self.patch_embedding = PatchEmbedding(config.image_size, config.patch_size, hidden)
        self.type_embedding = nn.Embedding(2, hidden)
        self.layers = nn.ModuleList(
            SelfAttentionBlock(hidden, config.num_heads, config.intermediate_size) for _ in range(config.num_layers)
        )
        self.final_norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, config.num_answers)

        self.apply(init_weights)

    def forward(
        self,
        text_ids: Tensor,
        text_mask: Tensor,
        pixels: Tensor,
        text_keep: Tensor | None = None,
        image_keep: Tensor | None = None,
    ) -> VLModelOutput:
        """Answer logits for ``[B, T]`` question ids and ``[B, 3, H, W]`` pixels in [-1, 1]."""
        kept = self.select_tokens(text_ids, text_mask, pixels, text_keep, image_keep)
        text_type, image_type = self.type_embedding.weight
        text = self.text_embedding(kept.text_ids, kept.text_positions) + text_type
        image = self.patch_embedding(pixels, kept.image_positions) + image_type
        x = torch.cat([text, image], dim=1)
        image_mask = torch.ones(kept.image_positions.shape, dtype=torch.bool, device=x.device)
        key_mask = torch.cat([kept.text_mask, image_mask], dim=1)
        hidden_states = [x]
        attentions: list[AttentionMap] = []
        for index, layer in enumerate(self.layers):
            x, probs = layer(x, key_mask)
            hidden_states.append(x)
            attentions.append(AttentionMap(f"layers.{index}.attention", "self", index, "joint", "joint", probs))
        logits = self.classifier(self.final_norm(x[:, 0]))
        return VLModelOutput(
            logits=logits,
            attentions=attentions,
            hidden_states={"joint": hidden_states},
            text_positions=kept.text_positions,
            image_positions=kept.image_positions,
            text_mask=kept.text_mask,
            stream_layout={"joint": ("text", "image")},
        )
