"""AttnLRP (Achtibat et al., ICML 2024, arXiv 2402.05602) through the built-in models' layers.

The rules, as the paper states them and its authors' library (LXT) applies them:

- Linear ``z = x Wᵀ + b``: ε-rule, R_j = x_j Σ_k w_kj R_k / z_k; the bias keeps b_k R_k / z_k (eq. 8).
- softmax ``s = softmax(x)``: Taylor decomposition at x with the bias term kept (Prop. 3.1),
  R_i = x_i (R_i' - s_i Σ_j R_j'); the bias term keeps Σ_j R_j' (1 - x_j + Σ_i s_i x_i).
- a product of two inputs (the attention matmuls Q·Kᵀ and A·V, the dual encoder's similarity):
  ε-rule over each product term, then the uniform rule, half to each operand (Prop. 3.3).
- LayerNorm: 1/std held constant (identity rule, Prop. 3.4), ε-rule on the centring, identity
  on the gain; its bias β keeps β_k R_k / y_k.
- GELU, the L2 normalisation and the constant scales (1/√d, the temperature): identity.
- a skip connection ``a + b``: ε-rule, R_a = a R / (a + b); a tensor used twice sums its relevances.

Relevance starts at the explained output's value (a logit; z_A - z_B for a contrast; the dual
encoder's similarity), so the embeddings' relevance plus what the biases and softmax bias terms
keep equals that value. ``AttnLRPResult.absorbed`` is that ledger, each term computed in closed
form from the forward values (not as a difference), so ``conservation_error`` tests the rules:
it is the conservation that LXT's own check tests ("for all operations excluding bias terms").
Denominators get ε = 1e-9 with the sign of the value (float64 throughout).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from vlinterpret_panel.adapters.base import ModelAdapter, ModelInput
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.models.dual_encoder import DualEncoderModel
from vlinterpret_panel.models.dual_stream import CoAttentionLayer, DualStreamModel
from vlinterpret_panel.models.layers import CrossAttentionBlock, MultiHeadAttention, SelfAttentionBlock
from vlinterpret_panel.models.single_stream import SingleStreamModel
from vlinterpret_panel.relevancy.lrp import (
    ActivationRecorder,
    RecordedPass,
    blocks_of,
    merge_heads,
    recorded_pass,
    split_heads,
    weight_of,
)
from vlinterpret_panel.relevancy.targets import Target

EPSILON = 1e-9
BIAS, NORM_BIAS, SOFTMAX = "linear bias", "layer norm bias", "softmax bias term"


def stabilize(values: Tensor) -> Tensor:
    """values + ε with the sign of each value (0 counts as positive), so no denominator is 0."""
    return values + EPSILON * torch.where(values >= 0, 1.0, -1.0).to(values.dtype)


def linear_rule(inputs: Tensor, weight: Tensor, bias: Tensor | None, relevance: Tensor) -> tuple[Tensor, float]:
    """ε-rule through ``z = x Wᵀ + b``: relevance of ``inputs`` ``[..., in]``, and what the bias keeps."""
    outputs = inputs @ weight.T + (0.0 if bias is None else bias)
    denominator = stabilize(outputs)
    scaled = relevance / denominator
    kept = (denominator - outputs + (0.0 if bias is None else bias)) * scaled
    return inputs * (scaled @ weight), float(kept.sum())


def softmax_rule(inputs: Tensor, relevance: Tensor) -> tuple[Tensor, float]:
    """Prop. 3.1 through ``softmax(inputs, dim=-1)``: relevance of ``inputs``, and what the bias term keeps.

    Masked inputs (-inf, or the dtype's lowest value) count as 0: their probability and relevance are 0.
    """
    masked = inputs <= torch.finfo(inputs.dtype).min / 2
    probabilities = inputs.masked_fill(masked, -math.inf).softmax(dim=-1)
    values = inputs.masked_fill(masked, 0.0)
    total = relevance.sum(dim=-1, keepdim=True)
    expected = (probabilities * values).sum(dim=-1, keepdim=True)
    kept = (relevance * (1.0 - values + expected)).sum()
    return values * (relevance - probabilities * total), float(kept)


def product_rule(left: Tensor, right: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """Prop. 3.3 through ``left @ right``: each term's share of R by the ε-rule, half to each operand."""
    scaled = relevance / stabilize(left @ right) / 2
    return left * (scaled @ right.transpose(-1, -2)), right * (left.transpose(-1, -2) @ scaled)


def layer_norm_rule(norm: nn.LayerNorm, inputs: Tensor, relevance: Tensor) -> tuple[Tensor, float]:
    """Through a LayerNorm with 1/std held constant: relevance of ``inputs`` ``[..., D]``, and what β keeps."""
    centred = inputs - inputs.mean(dim=-1, keepdim=True)
    std = (centred.pow(2).mean(dim=-1, keepdim=True) + norm.eps).sqrt()
    gain = norm.weight.detach().double() / std
    bias = norm.bias.detach().double()
    outputs = centred * gain + bias
    denominator = stabilize(outputs)
    scaled = relevance / denominator
    kept = (denominator - outputs + bias) * scaled
    through = gain * scaled
    return inputs * (through - through.mean(dim=-1, keepdim=True)), float(kept.sum())


def add_rule(first: Tensor, second: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """ε-rule through ``first + second``: each term's share of R in proportion to its value."""
    scaled = relevance / stabilize(first + second)
    return first * scaled, second * scaled


@dataclass
class AttnLRPResult:
    """One example's AttnLRP: the explained value, each stream's embedding relevance, and the ledger.

    ``inputs`` maps a stream name to the relevance of its first block's input ``[1, T, D]``;
    ``absorbed`` maps each kind of bias term to the relevance it kept.
    """

    output: float
    inputs: dict[str, Tensor]
    absorbed: dict[str, float]

    @property
    def input_total(self) -> float:
        """Total relevance reaching the embeddings."""
        return float(sum(part.sum() for part in self.inputs.values()))

    @property
    def conservation_error(self) -> float:
        """``output`` minus what reached the embeddings and what the bias terms kept (0 when conserved)."""
        return self.output - self.input_total - sum(self.absorbed.values())


@dataclass
class _Propagation:
    """The rules applied over the recorded modules of one pass, adding up what the bias terms keep."""

    recorder: ActivationRecorder
    absorbed: dict[str, float] = field(default_factory=lambda: {BIAS: 0.0, NORM_BIAS: 0.0, SOFTMAX: 0.0})

    def linear(self, module: nn.Linear, relevance: Tensor) -> Tensor:
        bias = None if module.bias is None else module.bias.detach().double()
        result, kept = linear_rule(self.recorder.input_of(module), weight_of(module), bias, relevance)
        self.absorbed[BIAS] += kept
        return result

    def norm(self, module: nn.LayerNorm, relevance: Tensor) -> Tensor:
        result, kept = layer_norm_rule(module, self.recorder.input_of(module), relevance)
        self.absorbed[NORM_BIAS] += kept
        return result

    def attention(self, attention: MultiHeadAttention, relevance: Tensor) -> tuple[Tensor, Tensor]:
        """From the relevance of an attention module's output: that of its query input and its key/value input."""
        heads, recorder = attention.num_heads, self.recorder
        queries, keys, values = (
            split_heads(recorder.output_of(linear), heads)
            for linear in (attention.query, attention.key, attention.value)
        )
        probabilities = recorder.outputs[attention][1].double()
        scores = queries @ keys.transpose(-1, -2) / math.sqrt(attention.head_size)
        scores = scores.masked_fill(probabilities == 0, torch.finfo(scores.dtype).min)
        relevance_probabilities, relevance_values = product_rule(
            probabilities, values, split_heads(self.linear(attention.output, relevance), heads)
        )
        relevance_scores, kept = softmax_rule(scores, relevance_probabilities)
        self.absorbed[SOFTMAX] += kept
        relevance_queries, relevance_keys_t = product_rule(queries, keys.transpose(-1, -2), relevance_scores)
        query_input = self.linear(attention.query, merge_heads(relevance_queries))
        context = self.linear(attention.key, merge_heads(relevance_keys_t.transpose(-1, -2)))
        return query_input, context + self.linear(attention.value, merge_heads(relevance_values))

    def block(self, block: SelfAttentionBlock, relevance: Tensor) -> Tensor:
        """Through ``x + Attn(LN(x))`` then ``+ MLP(LN(·))``: the relevance of the block's input."""
        recorder, mlp = self.recorder, block.mlp
        block_input = recorder.input_of(block)
        attended = recorder.output_of(block.attention.output)
        middle = block_input + attended
        relevance_middle, relevance_mlp = add_rule(middle, recorder.output_of(mlp.dense_out), relevance)
        hidden = self.linear(mlp.dense_out, relevance_mlp)
        relevance_middle = relevance_middle + self.norm(block.norm_mlp, self.linear(mlp.dense_in, hidden))
        relevance_input, relevance_attended = add_rule(block_input, attended, relevance_middle)
        queries, context = self.attention(block.attention, relevance_attended)
        return relevance_input + self.norm(block.norm_attention, queries + context)

    def cross_block(self, block: CrossAttentionBlock, relevance: Tensor) -> tuple[Tensor, Tensor]:
        """Through ``x + Attn(LN_q(x), LN_kv(context))``: relevance of ``x`` and of ``context``."""
        query_stream = self.recorder.input_of(block)
        attended = self.recorder.output_of(block.attention.output)
        relevance_skip, relevance_attended = add_rule(query_stream, attended, relevance)
        queries, context = self.attention(block.attention, relevance_attended)
        return relevance_skip + self.norm(block.norm_query, queries), self.norm(block.norm_context, context)

    def stack(self, blocks: Sequence[SelfAttentionBlock], relevance: Tensor) -> Tensor:
        """Through a stack of blocks, last first: the relevance of the first block's input."""
        for block in reversed(blocks):
            relevance = self.block(block, relevance)
        return relevance

    def co_attention(self, layer: CoAttentionLayer, text: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        """Through one co-attention layer: the relevance of its text and image inputs."""
        text_crossed, image_crossed = self.block(layer.text_self, text), self.block(layer.image_self, image)
        text_own, image_as_context = self.cross_block(layer.text_cross, text_crossed)
        image_own, text_as_context = self.cross_block(layer.image_cross, image_crossed)
        return text_own + text_as_context, image_own + image_as_context

    def pooled(self, last_state: Tensor, norm: nn.LayerNorm, relevance_normed: Tensor) -> Tensor:
        """Relevance of a stream's last states ``[1, T, D]`` when only token 0, layer-normed, is read."""
        relevance = torch.zeros_like(last_state)
        relevance[:, 0] = self.norm(norm, relevance_normed)
        return relevance


def propagate(
    model: nn.Module, recorder: ActivationRecorder, output_index: int = 0, versus: int | None = None
) -> AttnLRPResult:
    """AttnLRP from the explained output of a recorded one-example pass down to each stream's embeddings.

    Answer models: relevance z_i on logit ``output_index`` (and -z_j on ``versus``: the contrast
    z_i - z_j); dual encoder: the similarity's value.
    """
    rules = _Propagation(recorder)
    if isinstance(model, SingleStreamModel | DualStreamModel):
        logits = recorder.output_of(model.classifier)
        if logits.shape[0] != 1:
            raise VLIError("AttnLRP explains one example at a time")
        start = torch.zeros_like(logits)
        start[0, output_index] = logits[0, output_index]
        if versus is not None:
            start[0, versus] = -logits[0, versus]
        normed = rules.linear(model.classifier, start)
        if isinstance(model, SingleStreamModel):
            last = rules.pooled(recorder.output_of(model.layers[-1]), model.final_norm, normed)
            return AttnLRPResult(
                float(start.sum()), {"joint": rules.stack(blocks_of(model.layers), last)}, rules.absorbed
            )
        last_text, last_image, _ = recorder.outputs[model.cross_layers[-1]]
        text = rules.pooled(last_text.double(), model.final_norm, normed)
        image = torch.zeros_like(last_image.double())
        for layer in reversed(cast(list[CoAttentionLayer], list(model.cross_layers))):
            text, image = rules.co_attention(layer, text, image)
        inputs = {
            "text": rules.stack(blocks_of(model.text_layers), text),
            "image": rules.stack(blocks_of(model.image_layers), image),
        }
        return AttnLRPResult(float(start.sum()), inputs, rules.absorbed)
    if isinstance(model, DualEncoderModel):
        return _dual_encoder(model, rules)
    raise VLIError(f"AttnLRP is implemented for the built-in models, not {type(model).__name__}")


def _dual_encoder(model: DualEncoderModel, rules: _Propagation) -> AttnLRPResult:
    """From the similarity ``scale · imageᵤ·textᵤ`` through both towers (normalisation and scale: identity)."""
    recorder = rules.recorder
    text = recorder.output_of(model.text_projection)
    image = recorder.output_of(model.image_projection)
    if text.shape[0] != 1 or image.shape[0] != 1:
        raise VLIError("AttnLRP explains one example at a time")
    text_unit, image_unit = nn.functional.normalize(text, dim=-1), nn.functional.normalize(image, dim=-1)
    scale = float(model.logit_scale.detach().clamp(max=math.log(100.0)).exp())
    similarity = scale * image_unit @ text_unit.T
    relevance_image, relevance_text = product_rule(image_unit, text_unit.T, similarity)
    towers = (
        ("text", model.text_projection, model.text_norm, model.text_layers, relevance_text.T),
        ("image", model.image_projection, model.image_norm, model.image_layers, relevance_image),
    )
    inputs = {}
    for stream, projection, norm, layers, relevance_unit in towers:
        last = rules.pooled(recorder.output_of(layers[-1]), norm, rules.linear(projection, relevance_unit))
        inputs[stream] = rules.stack(blocks_of(layers), last)
    return AttnLRPResult(float(similarity.sum()), inputs, rules.absorbed)


def stream_tokens(run: RecordedPass) -> dict[str, np.ndarray]:
    """Per stream, the capture position of each row of its first block's input (the first attention's queries)."""
    model = run.model
    stacks = {"joint": "layers", "text": "text_layers", "image": "image_layers"}
    calls = run.recorder.attention_calls
    positions = {}
    for stream, name in stacks.items():
        layers = getattr(model, name, None)
        if layers is not None:
            first = calls.index(blocks_of(layers)[0].attention)
            positions[stream] = np.asarray(run.capture.attentions[first].query_tokens)
    return positions


def token_relevance(
    adapter: ModelAdapter, item: ModelInput, target: str | int | Target | None = None
) -> tuple[np.ndarray, AttnLRPResult]:
    """AttnLRP relevance of each token ``(T,)`` in the schema's token order (summed over features), and the result.

    ``target`` as in ``relevancy.targets`` (default: the predicted answer).
    """
    return token_relevance_of(recorded_pass(adapter, item, target))


def token_relevance_of(run: RecordedPass) -> tuple[np.ndarray, AttnLRPResult]:
    """``token_relevance`` of an already recorded pass (one pass can serve LRP and AttnLRP)."""
    result = propagate(run.model, run.recorder, run.output_index, run.versus)
    values = np.zeros(len(run.capture.tokens))
    for stream, positions in stream_tokens(run).items():
        per_token = result.inputs[stream][0].sum(dim=-1).numpy()
        if len(per_token) != len(positions):
            raise VLIError(f"{len(per_token)} AttnLRP relevances for {len(positions)} {stream} tokens")
        values[positions] = per_token
    return values, result
