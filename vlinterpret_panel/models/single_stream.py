"""Single-stream (ViLT-like) VQA model: one transformer over ``[CLS] text [SEP] patches``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlinterpret_panel.models.layers import (
    BaseVLModel,
    KeptTokens,
    ModelConfig,
    VLModelOutput,
    init_weights,
    run_self_attention_stack,
    self_attention_stack,
)


class SingleStreamModel(BaseVLModel):
    """Text and image tokens share every self-attention layer; the answer is read at [CLS].

    The joint sequence is the kept text tokens (``[CLS]`` first) followed by the kept patches;
    a learned type embedding tells the two modalities apart.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.type_embedding = nn.Embedding(2, hidden)
        self.layers = self_attention_stack(config, config.num_layers)
        self.final_norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, config.num_answers)

        self.apply(init_weights)

    def forward_tokens(self, kept: KeptTokens, pixels: Tensor) -> VLModelOutput:
        """Answer logits for the kept question tokens and the kept patches of ``pixels``."""
        text_type, image_type = self.type_embedding.weight
        text = self.text_embedding(kept.text_ids, kept.text_positions) + text_type
        image = self.patch_embedding(pixels, kept.image_positions) + image_type
        x = torch.cat([text, image], dim=1)
        image_mask = torch.ones(kept.image_positions.shape, dtype=torch.bool, device=x.device)
        key_mask = torch.cat([kept.text_mask, image_mask], dim=1)
        x, hidden_states, attentions = run_self_attention_stack(
            self.layers, x, key_mask, name="layers", kind="self", stream="joint"
        )
        logits = self.classifier(self.final_norm(x[:, 0]))
        return VLModelOutput.from_kept(
            kept, logits, attentions, {"joint": hidden_states}, stream_layout={"joint": ("text", "image")}
        )
