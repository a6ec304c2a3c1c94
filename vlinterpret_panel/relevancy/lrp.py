"""LRP relevance of the attention maps of the built-in models (Chefer et al., arXiv 2012.09838).

Transformer Attribution needs R^A_b, the LRP relevance of each block's attention
probabilities. We own the layers of the built-in models (``vlinterpret_panel.models.layers``),
so the relevance is propagated here over those modules, from their weights and the
activations of one forward pass recorded by forward hooks (the model code is not touched):

- Linear: α=1, β=0 with one common denominator, R_j = Σ_k (x_j w_jk)⁺ / Σ_j' (x_j' w_j'k)⁺ · R_k
  (biases take no relevance);
- GELU, softmax, LayerNorm, the L2 normalisation of the dual encoder: relevance passes unchanged;
- the two attention matmuls (Q·Kᵀ and A·V) and the dual encoder's similarity: each operand
  gets half of gradient × input / output;
- a skip connection x + f(x): split by x·R/(x + f), then rescaled so each branch carries a
  share of R proportional to |its total| and the two add up to R (conservation);
- a tensor used twice (the block input feeding the skip and the LayerNorm, Q/K/V from one
  input): the relevances add up;
- divisions add ε = 1e-9 to the denominator, and 0/0 is 0.

Supported: the single-stream model, each tower of the dual encoder, and the dual-stream
model: a cross-attention block ``x + Attn(LN(x), LN(context))`` takes the skip rule, gives its
query path's relevance to ``x`` and its key/value paths' to ``context``; in a co-attention layer
each stream's input collects its own block's share and the other block's context share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from vlinterpret_panel.adapters.base import ForwardCapture, ModelAdapter, ModelInput, attention_frame
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.models.dual_encoder import DualEncoderModel
from vlinterpret_panel.models.dual_stream import CoAttentionLayer, DualStreamModel
from vlinterpret_panel.models.layers import CrossAttentionBlock, MultiHeadAttention, SelfAttentionBlock
from vlinterpret_panel.models.single_stream import SingleStreamModel
from vlinterpret_panel.relevancy.targets import Target

EPSILON = 1e-9


def safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / (denominator + ε), and 0 where the denominator is exactly 0."""
    shifted = denominator + EPSILON
    shifted = torch.where(shifted == 0, torch.full_like(shifted, EPSILON), shifted)
    return torch.where(denominator == 0, torch.zeros_like(numerator), numerator / shifted)


def linear_relevance(inputs: Tensor, weight: Tensor, relevance: Tensor) -> Tensor:
    """α=1, β=0 rule through ``y = x Wᵀ (+ b)``: relevance of ``inputs`` ``[..., in]`` from ``[..., out]``.

    Positive contributions x_j w_jk > 0 share R_k in proportion, over one common denominator
    Σ_j (x_j w_jk)⁺ (positive inputs on positive weights plus negative inputs on negative weights).
    """
    positive_x, negative_x = inputs.clamp(min=0), inputs.clamp(max=0)
    positive_w, negative_w = weight.clamp(min=0), weight.clamp(max=0)
    denominator = positive_x @ positive_w.T + negative_x @ negative_w.T
    scaled = safe_divide(relevance, denominator)
    return positive_x * (scaled @ positive_w) + negative_x * (scaled @ negative_w)


def matmul_relevance(left: Tensor, right: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """Relevance of both operands of ``left @ right``: half of gradient × input / output each."""
    scaled = safe_divide(relevance, left @ right)
    return left * (scaled @ right.transpose(-1, -2)) / 2, right * (left.transpose(-1, -2) @ scaled) / 2


def add_relevance(first: Tensor, second: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """Relevance of both terms of a skip connection ``first + second``, renormalised to conserve the total."""
    scaled = safe_divide(relevance, first + second)
    parts = (first * scaled, second * scaled)
    sums = [part.sum() for part in parts]
    magnitude = sums[0].abs() + sums[1].abs()
    total = relevance.sum()
    return tuple(  # type: ignore[return-value]
        part * safe_divide(safe_divide(part_sum.abs(), magnitude) * total, part_sum)
        for part, part_sum in zip(parts, sums, strict=True)
    )


class ActivationRecorder:
    """Forward hooks recording the inputs and outputs of every module of a model (one call each)."""

    def __init__(self, model: nn.Module) -> None:
        self.inputs: dict[nn.Module, tuple] = {}
        self.outputs: dict[nn.Module, Any] = {}
        self.attention_calls: list[MultiHeadAttention] = []
        self._handles = [module.register_forward_hook(self._record) for module in model.modules()]

    def _record(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if module in self.inputs:
            raise VLIError("LRP records one forward pass of one example; a module was called twice")
        self.inputs[module] = tuple(_detach(value) for value in inputs)
        self.outputs[module] = _detach(output)
        if isinstance(module, MultiHeadAttention):
            self.attention_calls.append(module)

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()

    def input_of(self, module: nn.Module) -> Tensor:
        """The first positional input of a recorded module, as float64."""
        return self.inputs[module][0].double()

    def output_of(self, module: nn.Module) -> Tensor:
        """The (first) output of a recorded module, as float64."""
        output = self.outputs[module]
        return (output[0] if isinstance(output, tuple) else output).double()


def _detach(value: object) -> object:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(item) for item in value)
    return value


def weight_of(linear: nn.Linear) -> Tensor:
    """A linear layer's weight, detached, as float64."""
    return linear.weight.detach().double()


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``[B, T, H * d]`` to ``[B, H, T, d]``."""
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``[B, H, T, d]`` to ``[B, T, H * d]``."""
    batch, heads, length, size = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * size)


def attention_module_relevance(
    attention: MultiHeadAttention, recorder: ActivationRecorder, relevance: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """From the relevance of an attention module's output: that of its query input, its key/value input and R^A.

    The output projection takes the linear rule, A·V and Q·Kᵀ the matmul rule, softmax passes;
    the key and value projections read the same input, so their relevances add up.
    """
    heads = attention.num_heads
    relevance_mixed = linear_relevance(recorder.input_of(attention.output), weight_of(attention.output), relevance)
    queries, keys, values = (
        split_heads(recorder.output_of(linear), heads) for linear in (attention.query, attention.key, attention.value)
    )
    probabilities = recorder.outputs[attention][1].double()
    relevance_probabilities, relevance_values = matmul_relevance(
        probabilities, values, split_heads(relevance_mixed, heads)
    )
    relevance_queries, relevance_keys_t = matmul_relevance(queries, keys.transpose(-1, -2), relevance_probabilities)
    relevance_query_input = linear_relevance(
        recorder.input_of(attention.query), weight_of(attention.query), merge_heads(relevance_queries)
    )
    relevance_context = linear_relevance(
        recorder.input_of(attention.key), weight_of(attention.key), merge_heads(relevance_keys_t.transpose(-1, -2))
    ) + linear_relevance(recorder.input_of(attention.value), weight_of(attention.value), merge_heads(relevance_values))
    return relevance_query_input, relevance_context, relevance_probabilities


def block_relevance(
    block: SelfAttentionBlock, recorder: ActivationRecorder, relevance: Tensor
) -> tuple[Tensor, Tensor]:
    """Propagate the relevance of a block's output ``[B, T, D]`` to its input; also return R^A ``[B, H, T, T]``."""
    attention, mlp = block.attention, block.mlp
    block_input = recorder.input_of(block)
    attended = recorder.output_of(attention.output)
    middle = block_input + attended
    mlp_out = recorder.output_of(mlp.dense_out)
    relevance_middle, relevance_mlp = add_relevance(middle, mlp_out, relevance)
    relevance_hidden = linear_relevance(recorder.input_of(mlp.dense_out), weight_of(mlp.dense_out), relevance_mlp)
    relevance_normed = linear_relevance(recorder.input_of(mlp.dense_in), weight_of(mlp.dense_in), relevance_hidden)
    relevance_middle = relevance_middle + relevance_normed
    relevance_input, relevance_attended = add_relevance(block_input, attended, relevance_middle)
    relevance_queries, relevance_context, relevance_attention = attention_module_relevance(
        attention, recorder, relevance_attended
    )
    return relevance_input + relevance_queries + relevance_context, relevance_attention


def cross_block_relevance(
    block: CrossAttentionBlock, recorder: ActivationRecorder, relevance: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Through ``x + Attn(LN(x), LN(context))``: relevance of ``x``, of ``context``, and R^A ``[B, H, Q, K]``."""
    query_stream = recorder.input_of(block)
    attended = recorder.output_of(block.attention.output)
    relevance_skip, relevance_attended = add_relevance(query_stream, attended, relevance)
    relevance_queries, relevance_context, relevance_attention = attention_module_relevance(
        block.attention, recorder, relevance_attended
    )
    return relevance_skip + relevance_queries, relevance_context, relevance_attention


def blocks_of(layers: nn.ModuleList) -> list[SelfAttentionBlock]:
    """A stack's blocks, typed (``nn.ModuleList`` items are plain modules to a type checker)."""
    return cast(list[SelfAttentionBlock], list(layers))


def co_attention_relevance(
    layer: CoAttentionLayer, recorder: ActivationRecorder, relevance_text: Tensor, relevance_image: Tensor
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Through one co-attention layer: relevance of its text and image inputs, and R^A of its four maps.

    The maps come in execution order (text→image cross, image→text cross, text self, image
    self). Each stream's input feeds its own cross block (query and skip) and the other
    stream's (keys and values): the two relevances add up.
    """
    relevance_text_crossed, text_self = block_relevance(layer.text_self, recorder, relevance_text)
    relevance_image_crossed, image_self = block_relevance(layer.image_self, recorder, relevance_image)
    text_from_own, image_as_context, text_to_image = cross_block_relevance(
        layer.text_cross, recorder, relevance_text_crossed
    )
    image_from_own, text_as_context, image_to_text = cross_block_relevance(
        layer.image_cross, recorder, relevance_image_crossed
    )
    maps = [text_to_image, image_to_text, text_self, image_self]
    return text_from_own + text_as_context, image_from_own + image_as_context, maps


def stack_relevance(
    blocks: Sequence[SelfAttentionBlock], recorder: ActivationRecorder, relevance: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """Propagate through a stack of blocks, last first: input relevance and R^A per block (in block order)."""
    per_block = []
    for block in reversed(blocks):
        relevance, relevance_attention = block_relevance(block, recorder, relevance)
        per_block.append(relevance_attention)
    return relevance, per_block[::-1]


@dataclass
class LRPResult:
    """Relevance of one forward pass: the explained output's, each stream's input's, each attention map's.

    ``attention`` follows the model's attention calls (execution order), each ``[B, H, Q, K]``;
    ``inputs`` maps a stream name to the relevance of its embeddings (the first block's input).
    """

    output: float
    inputs: dict[str, Tensor]
    attention: list[Tensor]

    @property
    def input_total(self) -> float:
        """Total relevance reaching the embeddings (≈ ``output`` when relevance is conserved)."""
        return float(sum(part.sum() for part in self.inputs.values()))


def propagate(
    model: nn.Module, recorder: ActivationRecorder, output_index: int = 0, versus: int | None = None
) -> LRPResult:
    """LRP from output ``output_index`` (relevance 1) of a recorded one-example pass down to the embeddings.

    Single stream: the answer logit ``output_index``; dual encoder: the image-text similarity
    (its only output for one pair). ``versus`` (answer models): a contrast, relevance 1 on
    ``output_index`` and -1 on ``versus``, so the input's relevance totals 0.
    """
    if isinstance(model, SingleStreamModel | DualStreamModel):
        logits = recorder.output_of(model.classifier)
        if logits.shape[0] != 1:
            raise VLIError("LRP explains one example at a time")
        start = torch.zeros_like(logits)
        start[0, output_index] = 1.0
        if versus is not None:
            start[0, versus] = -1.0
        pooled = linear_relevance(recorder.input_of(model.classifier), weight_of(model.classifier), start)
        if isinstance(model, SingleStreamModel):
            relevance = torch.zeros_like(recorder.output_of(model.layers[-1]))
            relevance[:, 0] = pooled
            joint_inputs, joint_attention = stack_relevance(blocks_of(model.layers), recorder, relevance)
            return LRPResult(float(start.sum()), {"joint": joint_inputs}, joint_attention)
        return _dual_stream_relevance(model, recorder, pooled, float(start.sum()))
    if isinstance(model, DualEncoderModel):
        text = recorder.output_of(model.text_projection)
        image = recorder.output_of(model.image_projection)
        if text.shape[0] != 1 or image.shape[0] != 1:
            raise VLIError("LRP explains one example at a time")
        text_unit, image_unit = nn.functional.normalize(text, dim=-1), nn.functional.normalize(image, dim=-1)
        relevance_text, relevance_image = matmul_relevance(text_unit, image_unit.T, torch.ones(1, 1, dtype=text.dtype))
        inputs: dict[str, Tensor] = {}
        attention: list[Tensor] = []
        towers = (
            ("text", model.text_projection, model.text_layers, relevance_text),
            ("image", model.image_projection, model.image_layers, relevance_image.T),
        )
        for stream, projection, layers, relevance_embedding in towers:
            pooled = linear_relevance(recorder.input_of(projection), weight_of(projection), relevance_embedding)
            last = recorder.output_of(layers[-1])
            relevance = torch.zeros_like(last)
            relevance[:, 0] = pooled
            inputs[stream], tower_attention = stack_relevance(blocks_of(layers), recorder, relevance)
            attention += tower_attention
        return LRPResult(1.0, inputs, attention)
    raise VLIError(f"LRP is implemented for the built-in models, not {type(model).__name__}")


def _dual_stream_relevance(
    model: DualStreamModel, recorder: ActivationRecorder, pooled: Tensor, output: float
) -> LRPResult:
    """From the last co-attention layer's text [CLS] back through the co-attention layers, then each stream's stack."""
    last_text, last_image, _ = recorder.outputs[model.cross_layers[-1]]
    relevance_text = torch.zeros_like(last_text.double())
    relevance_text[:, 0] = pooled
    relevance_image = torch.zeros_like(last_image.double())
    cross_maps: list[Tensor] = []
    for layer in reversed(cast(list[CoAttentionLayer], list(model.cross_layers))):
        relevance_text, relevance_image, maps = co_attention_relevance(layer, recorder, relevance_text, relevance_image)
        cross_maps = maps + cross_maps
    text_inputs, text_maps = stack_relevance(blocks_of(model.text_layers), recorder, relevance_text)
    image_inputs, image_maps = stack_relevance(blocks_of(model.image_layers), recorder, relevance_image)
    return LRPResult(output, {"text": text_inputs, "image": image_inputs}, text_maps + image_maps + cross_maps)


@dataclass
class RecordedPass:
    """One example's forward pass through a built-in model: its activations, capture and resolved target.

    ``output_index`` is the explained output (the answer, or the dual encoder's one score) and
    ``versus`` the contrast's second answer (``None`` without a contrast).
    """

    model: SingleStreamModel | DualStreamModel | DualEncoderModel
    recorder: ActivationRecorder
    capture: ForwardCapture
    output_index: int
    versus: int | None


def recorded_pass(adapter: ModelAdapter, item: ModelInput, target: str | int | Target | None = None) -> RecordedPass:
    """Run ``item`` once with every module's activations recorded, and resolve ``target`` on its answers.

    ``adapter`` must expose its built-in torch model as ``adapter.model``; ``target`` is as in
    ``relevancy.targets`` (default: the predicted answer; the dual encoder explains its one score).
    """
    model = getattr(adapter, "model", None)
    if not isinstance(model, SingleStreamModel | DualStreamModel | DualEncoderModel):
        raise VLIError(f"{adapter.name}: LRP needs a built-in model (adapter.model); got {type(model).__name__}")
    recorder = ActivationRecorder(model)
    try:
        with torch.no_grad():
            capture = adapter.forward(item.image, item.text)
    finally:
        recorder.close()
    target = Target.parse(target)
    if capture.output_labels is None:
        if not target.is_default:
            target.contrast_caption()  # the one target of a similarity model besides its score: say so if not that
            raise VLIError(
                f"{adapter.name}: LRP and AttnLRP explain this caption's score only; target {str(target)!r} "
                "(against another caption) is for the gradient methods (generic, attention_gradcam)"
            )
        return RecordedPass(model, recorder, capture, 0, None)
    logits = capture.output.reshape(-1).float().numpy()
    output_index, versus = target.resolve(logits, list(capture.output_labels), item.label)
    return RecordedPass(model, recorder, capture, output_index, versus)


def attention_relevance(
    adapter: ModelAdapter, item: ModelInput, target: str | int | Target | None = None
) -> tuple[np.ndarray, float]:
    """R^A of every attention map in the schema's ``(layer, head, T, T)`` frame, and the input total.

    ``target`` as in ``recorded_pass``; a contrast starts LRP at +1 and -1 on its two answers.
    """
    return attention_relevance_of(recorded_pass(adapter, item, target))


def attention_relevance_of(run: RecordedPass) -> tuple[np.ndarray, float]:
    """``attention_relevance`` of an already recorded pass (one pass can serve LRP and AttnLRP)."""
    result = propagate(run.model, run.recorder, run.output_index, run.versus)
    if len(result.attention) != len(run.capture.attentions):
        raise VLIError(f"{len(result.attention)} LRP maps for {len(run.capture.attentions)} captured maps")
    maps = [relevance[0].float() for relevance in result.attention]
    return attention_frame(run.capture, maps), result.input_total
