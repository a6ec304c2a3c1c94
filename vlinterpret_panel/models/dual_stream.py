"""Dual-stream (LXMERT-like) VQA model: per-modality encoders, then co-attention layers."""

from __future__ import annotations

from torch import Tensor, nn

from vlinterpret_panel.models.layers import (
    AttentionMap,
    BaseVLModel,
    CrossAttentionBlock,
    KeptTokens,
    ModelConfig,
    SelfAttentionBlock,
    VLModelOutput,
    init_weights,
    run_self_attention_stack,
    self_attention_stack,
)


class CoAttentionLayer(nn.Module):
    """Text->image and image->text cross-attention from the same inputs, then self-attention."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, heads, inner = config.hidden_size, config.num_heads, config.intermediate_size
        self.text_cross = CrossAttentionBlock(hidden, heads)
        self.image_cross = CrossAttentionBlock(hidden, heads)
        self.text_self = SelfAttentionBlock(hidden, heads, inner)
        self.image_self = SelfAttentionBlock(hidden, heads, inner)

    def forward(
        self, text: Tensor, image: Tensor, text_mask: Tensor
    ) -> tuple[Tensor, Tensor, list[tuple[str, str, Tensor]]]:
        """Return new text and image states and ``(module, kind, probs)`` in execution order."""
        text_crossed, text_to_image = self.text_cross(text, image)
        image_crossed, image_to_text = self.image_cross(image, text, text_mask)
        text_out, text_probs = self.text_self(text_crossed, text_mask)
        image_out, image_probs = self.image_self(image_crossed)
        maps = [
            ("text_cross", "cross_text_to_image", text_to_image),
            ("image_cross", "cross_image_to_text", image_to_text),
            ("text_self", "text_self", text_probs),
            ("image_self", "image_self", image_probs),
        ]
        return text_out, image_out, maps


_STREAMS = {
    "text_self": ("text", "text"),
    "image_self": ("image", "image"),
    "cross_text_to_image": ("text", "image"),
    "cross_image_to_text": ("image", "text"),
}


class DualStreamModel(BaseVLModel):
    """Text layers, image layers, then co-attention layers; the answer is read at text [CLS]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.text_layers = self_attention_stack(config, config.num_text_layers)
        self.image_layers = self_attention_stack(config, config.num_image_layers)
        self.cross_layers = nn.ModuleList(CoAttentionLayer(config) for _ in range(config.num_cross_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, config.num_answers)

        self.apply(init_weights)

    def forward_tokens(self, kept: KeptTokens, pixels: Tensor) -> VLModelOutput:
        """Answer logits for the kept question tokens and the kept patches of ``pixels``."""
        text = self.text_embedding(kept.text_ids, kept.text_positions)
        image = self.patch_embedding(pixels, kept.image_positions)
        text, text_states, attentions = run_self_attention_stack(
            self.text_layers, text, kept.text_mask, name="text_layers", kind="text_self", stream="text"
        )
        image, image_states, image_maps = run_self_attention_stack(
            self.image_layers, image, None, name="image_layers", kind="image_self", stream="image"
        )
        attentions += image_maps
        for index, layer in enumerate(self.cross_layers):
            text, image, maps = layer(text, image, kept.text_mask)
            text_states.append(text)
            image_states.append(image)
            for module, kind, probs in maps:
                query_stream, key_stream = _STREAMS[kind]
                attentions.append(
                    AttentionMap(f"cross_layers.{index}.{module}", kind, index, query_stream, key_stream, probs)
                )
        logits = self.classifier(self.final_norm(text[:, 0]))
        return VLModelOutput.from_kept(
            kept,
            logits,
            attentions,
            {"text": text_states, "image": image_states},
            stream_layout={"text": ("text",), "image": ("image",)},
        )
