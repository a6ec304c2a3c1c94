"""Dual-stream (LXMERT-like) VQA model: per-modality encoders, then co-attention layers."""

from __future__ import annotations

from torch import Tensor, nn

from vlinterpret_panel.models.layers import (
    AttentionMap,
    BaseVLModel,
    CrossAttentionBlock,
    ModelConfig,
    PatchEmbedding,
    SelfAttentionBlock,
    TextEmbedding,
    VLModelOutput,
    init_weights,
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
        super().__init__()
        self.config = config
        hidden, heads, inner = config.hidden_size, config.num_heads, config.intermediate_size
        self.text_embedding = TextEmbedding(config.vocab_size, config.max_text_length, hidden)
        self.patch_embedding = PatchEmbedding(config.image_size, config.patch_size, hidden)
        self.text_layers = nn.ModuleList(
            SelfAttentionBlock(hidden, heads, inner) for _ in range(config.num_text_layers)
        )
        self.image_layers = nn.ModuleList(
            SelfAttentionBlock(hidden, heads, inner) for _ in range(config.num_image_layers)
        )
        self.cross_layers = nn.ModuleList(CoAttentionLayer(config) for _ in range(config.num_cross_layers))
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
        text = self.text_embedding(kept.text_ids, kept.text_positions)
        image = self.patch_embedding(pixels, kept.image_positions)
        text_states, image_states = [text], [image]
        attentions: list[AttentionMap] = []
        for index, layer in enumerate(self.text_layers):
            text, probs = layer(text, kept.text_mask)
            text_states.append(text)
            attentions.append(AttentionMap(f"text_layers.{index}.attention", "text_self", index, "text", "text", probs))
        for index, layer in enumerate(self.image_layers):
            image, probs = layer(image)
            image_states.append(image)
            attentions.append(
                AttentionMap(f"image_layers.{index}.attention", "image_self", index, "image", "image", probs)
            )
        for index, layer in enumerate(self.cross_layers):
            text, image, maps = layer(text, image, kept.text_mask)
            text_states.append(text)
            image_states.append(image)
            for module, kind, probs in maps:
                query_stream, key_stream = _STREAMS[kind]
                attentions.append(
                    AttentionMap(
                        f"cross_layers.{index}.{module}",
                        kind,
                        index,
                        query_stream,
                        key_stream,
                        probs,
                    )
                )
        logits = self.classifier(self.final_norm(text[:, 0]))
        return VLModelOutput(
            logits=logits,
            attentions=attentions,
            hidden_states={"text": text_states, "image": image_states},
            text_positions=kept.text_positions,
            image_positions=kept.image_positions,
            text_mask=kept.text_mask,
            stream_layout={"text": ("text",), "image": ("image",)},
        )
