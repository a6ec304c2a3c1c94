"""Small pre-LN transformer layers that expose their attention probabilities.

The layers use only Linear, LayerNorm, GELU and softmax so that relevance propagation rules
can be written for them later. Each attention module returns the post-softmax probabilities
``[batch, heads, queries, keys]`` exactly as used to mix the values, so they stay in the
autograd graph: a caller can ``retain_grad()`` on them and read gradients of any output with
respect to each attention map. Token embeddings are looked up by each token's original
position index, so a model can run on any subset of its tokens (token deletion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlinterpret_panel.models.world import ANSWERS, VOCAB

ATTENTION_KINDS: tuple[str, ...] = (
    "self",
    "text_self",
    "image_self",
    "cross_text_to_image",
    "cross_image_to_text",
)


@dataclass
class AttentionMap:
    """One attention module's probabilities and what its queries and keys are.

    ``probs`` is ``[batch, heads, queries, keys]``; ``query_stream``/``key_stream`` name the
    token sequence (``"joint"``, ``"text"`` or ``"image"``) indexing its query/key axes.
    """

    name: str
    kind: str
    layer: int
    query_stream: str
    key_stream: str
    probs: Tensor


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention from a query sequence to a key/value sequence."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        self.num_heads = num_heads
        self.head_size = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_size).transpose(1, 2)

    def forward(
        self,
        queries: Tensor,
        keys_values: Tensor,
        key_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return the attended output ``[B, Q, D]`` and the probabilities ``[B, H, Q, K]``.

        ``key_mask`` is a bool ``[B, K]`` that is True for real keys; ``attention_mask`` a bool
        ``[B, Q, K]`` that is True where a query may see a key (causal decoders); masked keys
        get probability exactly zero.
        """
        q = self._split_heads(self.query(queries))
        k = self._split_heads(self.key(keys_values))
        v = self._split_heads(self.value(keys_values))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_size)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask[:, None], torch.finfo(scores.dtype).min)
        probs = scores.softmax(dim=-1)
        mixed = (probs @ v).transpose(1, 2).reshape(queries.shape[0], queries.shape[1], -1)
        return self.output(mixed), probs


class FeedForward(nn.Module):
    """Two Linear layers with a GELU between them."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.dense_in = nn.Linear(hidden_size, intermediate_size)
        self.activation = nn.GELU()
        self.dense_out = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the two-layer MLP to every token."""
        return self.dense_out(self.activation(self.dense_in(x)))


class SelfAttentionBlock(nn.Module):
    """Pre-LN block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int) -> None:
        super().__init__()
        self.norm_attention = nn.LayerNorm(hidden_size)
        self.attention = MultiHeadAttention(hidden_size, num_heads)
        self.norm_mlp = nn.LayerNorm(hidden_size)
        self.mlp = FeedForward(hidden_size, intermediate_size)

    def forward(
        self, x: Tensor, key_mask: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return the new hidden states and the attention probabilities (masks as ``MultiHeadAttention``)."""
        normed = self.norm_attention(x)
        attended, probs = self.attention(normed, normed, key_mask, attention_mask)
        x = x + attended
        x = x + self.mlp(self.norm_mlp(x))
        return x, probs


class CrossAttentionBlock(nn.Module):
    """Pre-LN cross-attention: ``x + Attn(LN_q(x), LN_kv(context))`` (no MLP)."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.norm_query = nn.LayerNorm(hidden_size)
        self.norm_context = nn.LayerNorm(hidden_size)
        self.attention = MultiHeadAttention(hidden_size, num_heads)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return ``x`` updated from ``context`` and probabilities ``[B, H, len(x), len(ctx)]``."""
        queries, keys_values = self.norm_query(x), self.norm_context(context)
        attended, probs = self.attention(queries, keys_values, context_mask)
        return x + attended, probs


class TextEmbedding(nn.Module):
    """Word embedding plus a position embedding looked up at each token's original position."""

    def __init__(self, vocab_size: int, max_length: int, hidden_size: int) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab_size, hidden_size)
        self.positions = nn.Embedding(max_length, hidden_size)

    def forward(self, token_ids: Tensor, positions: Tensor) -> Tensor:
        """Embed ``[B, T]`` ids whose original positions are ``positions`` ``[B, T]``."""
        return self.words(token_ids) + self.positions(positions)


class PatchEmbedding(nn.Module):
    """Cut images into non-overlapping square patches and embed each with one Linear layer.

    Patches are numbered in row-major order (patch 0 is the top-left one, row 0 is the top).
    """

    def __init__(self, image_size: int, patch_size: int, hidden_size: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.projection = nn.Linear(3 * patch_size * patch_size, hidden_size)
        self.positions = nn.Embedding(self.grid_size * self.grid_size, hidden_size)

    def patchify(self, pixels: Tensor) -> Tensor:
        """``[B, 3, H, W]`` float pixels to ``[B, N, 3 * p * p]`` flattened patches."""
        batch = pixels.shape[0]
        p, g = self.patch_size, self.grid_size
        patches = pixels.reshape(batch, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(batch, g * g, 3 * p * p)

    def forward(self, pixels: Tensor, positions: Tensor) -> Tensor:
        """Embed the patches listed by ``positions`` ``[B, K]`` (original patch indices)."""
        patches = gather_tokens(self.patchify(pixels), positions)
        return self.projection(patches) + self.positions(positions)


def self_attention_stack(config: ModelConfig, num_layers: int) -> nn.ModuleList:
    """``num_layers`` self-attention blocks sized by ``config`` (one encoder stack of a model)."""
    return nn.ModuleList(
        SelfAttentionBlock(config.hidden_size, config.num_heads, config.intermediate_size) for _ in range(num_layers)
    )


def run_self_attention_stack(
    layers: nn.ModuleList,
    x: Tensor,
    key_mask: Tensor | None,
    *,
    name: str,
    kind: str,
    stream: str,
) -> tuple[Tensor, list[Tensor], list[AttentionMap]]:
    """Run ``x`` through a stack of ``SelfAttentionBlock`` and record what the models report.

    Returns the final states, the hidden states (``x`` first, then after each block) and one
    ``AttentionMap`` per block, named ``f"{name}.{index}.attention"`` after the stack's attribute
    so that map names match the module names in the model.
    """
    states, attentions = [x], []
    for index, layer in enumerate(layers):
        x, probs = layer(x, key_mask)
        states.append(x)
        attentions.append(AttentionMap(f"{name}.{index}.attention", kind, index, stream, stream, probs))
    return x, states, attentions


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Select tokens ``x[b, index[b, k]]`` from ``[B, N, D]`` with ``index`` ``[B, K]``."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


def keep_index(keep: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """Normalise a kept-token index (``None`` = all, ``[K]`` or ``[B, K]``) to ``[B, K]`` int64."""
    if keep is None:
        return torch.arange(length, device=device).expand(batch, length)
    keep = torch.as_tensor(keep, dtype=torch.long, device=device)
    if keep.dim() == 1:
        keep = keep.expand(batch, -1)
    if keep.dim() != 2 or keep.shape[0] != batch:
        raise ValueError(f"kept-token index must be [K] or [{batch}, K], got {tuple(keep.shape)}")
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= length):
        raise ValueError(f"kept-token index out of range 0..{length - 1}")
    return keep


def pixels_from_uint8(images: Tensor) -> Tensor:
    """``[B, H, W, 3]`` uint8 images to ``[B, 3, H, W]`` float pixels in ``[-1, 1]``."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass
class ModelConfig:
    """Sizes of a built-in model; saved as JSON beside its weights.

    ``num_layers`` is the joint depth (single stream) or the depth of each encoder (dual
    encoder); the dual-stream model uses the three ``num_*_layers`` fields instead.
    """

    architecture: str
    hidden_size: int = 64
    num_heads: int = 4
    intermediate_size: int = 256
    num_layers: int = 4
    num_text_layers: int = 2
    num_image_layers: int = 2
    num_cross_layers: int = 2
    image_size: int = 64
    patch_size: int = 16
    vocab_size: int = len(VOCAB)
    max_text_length: int = 24
    num_answers: int = len(ANSWERS)
    projection_size: int = 64

    @property
    def num_patches(self) -> int:
        """Number of image tokens (patches) of a full image."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class VLModelOutput:
    """What every built-in model's forward returns.

    - ``logits``: VQA models ``[B, num_answers]`` (answer order: ``world.ANSWERS``); dual
      encoder ``[B, B]`` temperature-scaled cosine similarities, images (rows) x texts (cols).
    - ``attentions``: every attention module's map, in execution order.
    - ``hidden_states``: per stream, the states after the embeddings and after each block.
    - ``text_positions`` ``[B, Kt]`` / ``image_positions`` ``[B, Ki]``: original position of
      each token kept (text index into ``text_ids``; patch index, row-major, row 0 = top).
    - ``text_mask`` ``[B, Kt]``: True for real (non-padding) kept text tokens.
    - ``stream_layout``: per stream, the token segments in sequence order, e.g.
      ``{"joint": ("text", "image")}`` or ``{"text": ("text",), "image": ("image_cls", "image")}``.
    - ``text_embeds``/``image_embeds``: normalised projections (dual encoder only).
    """

    logits: Tensor
    attentions: list[AttentionMap]
    hidden_states: dict[str, list[Tensor]]
    text_positions: Tensor
    image_positions: Tensor
    text_mask: Tensor
    stream_layout: dict[str, tuple[str, ...]]
    text_embeds: Tensor | None = None
    image_embeds: Tensor | None = None

    @classmethod
    def from_kept(
        cls,
        kept: KeptTokens,
        logits: Tensor,
        attentions: list[AttentionMap],
        hidden_states: dict[str, list[Tensor]],
        stream_layout: dict[str, tuple[str, ...]],
        text_embeds: Tensor | None = None,
        image_embeds: Tensor | None = None,
    ) -> VLModelOutput:
        """An output whose positions and text mask are those of the tokens the pass ran on."""
        return cls(
            logits=logits,
            attentions=attentions,
            hidden_states=hidden_states,
            text_positions=kept.text_positions,
            image_positions=kept.image_positions,
            text_mask=kept.text_mask,
            stream_layout=stream_layout,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
        )


@dataclass
class KeptTokens:
    """The tokens a forward pass runs on, with their original positions."""

    text_ids: Tensor
    text_positions: Tensor
    text_mask: Tensor
    image_positions: Tensor


class BaseVLModel(nn.Module):
    """Shared embeddings, token selection and forward signature of the built-in models.

    ``forward(text_ids, text_mask, pixels, text_keep=None, image_keep=None)``: ``text_keep``
    and ``image_keep`` list the original indices of the text tokens / image patches to keep
    (``[K]`` for the whole batch or ``[B, K]``); deleted tokens are simply absent and the kept
    ones keep their original position embeddings. The text ``[CLS]`` (index 0) must be kept.
    Subclasses register their remaining modules after ``super().__init__(config)`` (the
    embeddings come first in every state dict) and implement ``forward_tokens``.
    """

    config: ModelConfig

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.text_embedding = TextEmbedding(config.vocab_size, config.max_text_length, config.hidden_size)
        self.patch_embedding = PatchEmbedding(config.image_size, config.patch_size, config.hidden_size)

    def forward(
        self,
        text_ids: Tensor,
        text_mask: Tensor,
        pixels: Tensor,
        text_keep: Tensor | None = None,
        image_keep: Tensor | None = None,
    ) -> VLModelOutput:
        """Run the model on ``[B, T]`` ids and ``[B, 3, H, W]`` pixels in [-1, 1], minus deleted tokens."""
        kept = self.select_tokens(text_ids, text_mask, pixels, text_keep, image_keep)
        return self.forward_tokens(kept, pixels)

    def forward_tokens(self, kept: KeptTokens, pixels: Tensor) -> VLModelOutput:
        """The model proper, on the already selected tokens (see ``select_tokens``)."""
        raise NotImplementedError

    def select_tokens(
        self,
        text_ids: Tensor,
        text_mask: Tensor,
        pixels: Tensor,
        text_keep: Tensor | None,
        image_keep: Tensor | None,
    ) -> KeptTokens:
        """Gather the kept text tokens and list the kept patches, validating the indices."""
        batch, length = text_ids.shape
        if length > self.config.max_text_length:
            raise ValueError(f"text longer than {self.config.max_text_length} tokens")
        expected = (batch, 3, self.config.image_size, self.config.image_size)
        if tuple(pixels.shape) != expected:
            raise ValueError(f"pixels must be {expected}, got {tuple(pixels.shape)}")
        device = text_ids.device
        text_positions = keep_index(text_keep, batch, length, device)
        if text_positions.shape[1] == 0 or bool((text_positions[:, 0] != 0).any()):
            raise ValueError("text_keep must start with 0: the [CLS] token is always kept")
        image_positions = keep_index(image_keep, batch, self.config.num_patches, device)
        return KeptTokens(
            text_ids=text_ids.gather(1, text_positions),
            text_positions=text_positions,
            text_mask=text_mask.bool().gather(1, text_positions),
            image_positions=image_positions,
        )


def init_weights(module: nn.Module) -> None:
    """BERT-style initialisation: small normal weights, zero biases (use with ``Module.apply``).

    Patch position embeddings start from 2-D sine/cosine codes (see ``grid_position_table``).

    Small embeddings keep position codes from drowning the patch and word content early in
    training, which makes the tiny models learn much faster.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, PatchEmbedding):
        with torch.no_grad():
            module.positions.weight.copy_(grid_position_table(module.grid_size, module.positions.weight.shape[1]))


def grid_position_table(grid_size: int, hidden_size: int, scale: float = 0.5) -> Tensor:
    """2-D sine/cosine codes ``[grid_size**2, hidden_size]`` for row-major patch positions.

    Half of the channels encode the row, half the column. Starting the (still learned) patch
    position embeddings here makes "where is ...?" learnable in a few thousand steps.
    """
    quarter = hidden_size // 4
    frequencies = 1.0 / (grid_size ** (torch.arange(quarter) / max(1, quarter)))
    coordinates = torch.arange(grid_size, dtype=torch.float32)
    angles = coordinates[:, None] * frequencies[None, :] * math.pi / 2
    codes = torch.cat([angles.sin(), angles.cos()], dim=1)
    rows = codes[:, None, :].expand(grid_size, grid_size, -1)
    cols = codes[None, :, :].expand(grid_size, grid_size, -1)
    table = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, -1)
    padded = torch.zeros(grid_size * grid_size, hidden_size)
    padded[:, : table.shape[1]] = table
    return padded * scale
