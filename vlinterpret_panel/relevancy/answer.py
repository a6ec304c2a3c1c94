"""Relevancy of every generated token of a causal decoder, computed layer by layer.

Generated token k is predicted by the query row ``r_k = position_k - 1``; causality makes that
row's computation the same in one forward pass over the whole generated sequence as in
generation step k, so one pass (and, for gradient methods, one backward pass per token)
explains every token. Each method is the registered one (``raw``, ``rollout``, ``gradcam``,
``generic``) applied to the sequence up to ``r_k`` read at row ``r_k`` (own entry 0, as
``common.read_out`` does), but computed one layer at a time, so that no more than one
layer's full ``[heads, T, T]`` maps exist at once (LLaVA-1.5: 32 layers x 32 heads x 600^2):

* raw attention: the last layer's head-mean row ``r_k``;
* rollout: ``J = M_L ... M_1`` with ``M_l = E_h[A_l] + I``, rows renormalised, accumulated
  forward (``J`` is ``T x T``, lower triangular: its row ``r_k`` only sees tokens <= ``r_k``);
* attention Grad-CAM: last layer, ``cam = (E_h[w_h A_h])^+`` with ``w_h`` the mean of
  ``dA_h`` over the ``t x t`` block of the sequence up to ``r_k`` (``t = r_k + 1``);
* generic (Chefer et al.'s self-attention rule for a causal stack): ``R = prod_l (I + Abar_l)``,
  ``Abar_l = E_h[(dA_l * A_l)^+]``, whose row ``r_k`` is accumulated *backwards* as a row vector
  ``v <- v + v Abar_l`` from ``v = e_{r_k}``, in the order the backward pass reaches the layers.

The gradient ``dA`` of a logit with respect to a layer's attention probabilities comes from
the gradient at the attention output ``O = A V`` (per head, before the output projection):
``dA = dO V^T``. So it needs neither the eager attention path nor ``A`` in the autograd
graph: it works with PyTorch SDPA and flash attention, from hooked queries, keys and values.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vlinterpret_panel.errors import VLIError

ANSWER_METHODS: tuple[str, ...] = ("raw_attention", "rollout", "attention_gradcam", "generic")
"""The relevancy methods that explain a generated token (``relevancy.registry`` names)."""
GRADIENT_METHODS: frozenset[str] = frozenset({"attention_gradcam", "generic"})
"""Those that need one backward pass per generated token."""
HEAD_CHUNK = 8
"""Heads whose full ``T x T`` maps are recomputed at once (bounds the transient memory)."""


@dataclass
class LayerAttention:
    """One decoder layer's attention inputs for one example, enough to recompute its probabilities.

    ``query``/``key``/``value`` are ``[heads, T, head_dim]`` (key/value heads already repeated
    for grouped-query attention), ``bias`` an additive ``[1 or heads, T, T]`` mask (0 where a
    query may see a key, -inf elsewhere; causal by construction), ``scaling`` the score factor.
    ``output`` is ``O = A V`` *in the autograd graph* (gradient methods differentiate at it),
    any tensor of one example whose values reshape to ``[T, heads, head_dim]`` (e.g. the
    ``[1, T, heads * head_dim]`` input of the output projection), or None without gradients.
    """

    query: Tensor
    key: Tensor
    value: Tensor
    bias: Tensor
    scaling: float
    output: Tensor | None = None

    @property
    def num_heads(self) -> int:
        return int(self.query.shape[0])

    def probabilities(
        self, rows: Tensor | slice | None = None, heads: Sequence[int] | None = None, size: int | None = None
    ) -> Tensor:
        """``softmax(Q K^T * scaling + bias)`` for ``rows`` of ``heads`` over the first ``size`` keys (float32)."""
        size = int(self.key.shape[1]) if size is None else size
        rows = slice(0, size) if rows is None else rows
        head_index = slice(None) if heads is None else torch.as_tensor(list(heads), dtype=torch.long)
        query = self.query[head_index][:, rows].detach().float()
        key = self.key[head_index][:, :size].detach().float()
        bias = self.bias[head_index if self.bias.shape[0] > 1 else slice(None)][:, rows, :size].float()
        scores = query @ key.transpose(-1, -2) * self.scaling + bias
        return scores.softmax(dim=-1)

    def head_mean(self, size: int | None = None) -> Tensor:
        """``E_h[A]`` over the first ``size`` tokens, ``[size, size]``, a few heads at a time."""
        size = int(self.key.shape[1]) if size is None else size
        total = torch.zeros(size, size)
        for first in range(0, self.num_heads, HEAD_CHUNK):
            heads = range(first, min(first + HEAD_CHUNK, self.num_heads))
            total += self.probabilities(heads=heads, size=size).sum(dim=0)
        return total / self.num_heads


GRADIENT_BATCH_BYTES = 64 * 2**20
"""Gradients (all layers' attention outputs) of this many bytes are computed in one batched backward pass."""


def _step_gradients(explained: Tensor, outputs: Sequence[Tensor]) -> Iterator[Sequence[Tensor | None]]:
    """The gradients of each of ``explained`` (one scalar per step) at ``outputs``, in order.

    Several steps share one backward pass (``is_grads_batched``: vmap over the vector-Jacobian products), as
    many as ``GRADIENT_BATCH_BYTES`` of gradients hold: one pass per step cost ~1.7 ms each on the built-in model,
    most of it the engine's fixed cost. The graph is kept for the next target."""
    per_step = max(1, sum(output.numel() * output.element_size() for output in outputs))
    batch = int(np.clip(GRADIENT_BATCH_BYTES // per_step, 1, len(explained)))
    for first in range(0, len(explained), batch):
        chosen = explained[first : first + batch]
        if len(chosen) == 1:
            yield torch.autograd.grad(chosen[0], outputs, retain_graph=True, allow_unused=True)
            continue
        one_hot = torch.eye(len(chosen), dtype=chosen.dtype)
        batched = torch.autograd.grad(
            chosen, outputs, grad_outputs=one_hot, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        for index in range(len(chosen)):
            yield [None if gradient is None else gradient[index] for gradient in batched]


def causal_bias(length: int, allowed: Tensor | None = None) -> Tensor:
    """``[1, T, T]`` additive mask: 0 where key <= query (and ``allowed``, a bool ``[.., T, T]``), -inf elsewhere."""
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    visible = causal if allowed is None else causal & allowed.reshape(-1, length, length).bool()
    return torch.zeros(visible.shape if visible.ndim == 3 else (1, length, length)).masked_fill(~visible, float("-inf"))


def _renormalised(matrix: Tensor) -> Tensor:
    sums = matrix.sum(dim=-1, keepdim=True)
    return torch.where(sums == 0, torch.zeros_like(matrix), matrix / torch.where(sums == 0, 1.0, sums))


class IncrementalRollout:
    """Rollout built while a KV-cached generation runs: the prompt's rows at once, then one row per step.

    ``J_l = M_l J_{l-1}`` is lower triangular, so row ``r`` of every ``J_l`` needs only rows ``<= r``
    of ``J_{l-1}``: the prefill fills rows ``0..P-1`` of every layer's ``J``, each decode step
    (one new query row ``r``) fills row ``r``. Holds one ``capacity x capacity`` matrix per layer.
    """

    def __init__(self, n_layers: int, capacity: int) -> None:
        self.joint = torch.zeros(n_layers, capacity, capacity)
        self.n_layers = n_layers

    def add(self, layer: int, mean_rows: Tensor, first_row: int) -> None:
        """Rows ``first_row ..`` of layer ``layer``'s head-mean attention ``E_h[A]`` (``[rows, keys]``, keys from 0)."""
        count, keys = mean_rows.shape
        rows = torch.arange(first_row, first_row + count)
        step = mean_rows.float().clone()
        step[torch.arange(count), rows] += 1.0
        step = _renormalised(step)
        if layer == 0:
            self.joint[0, first_row : first_row + count, :keys] = step
        else:
            self.joint[layer, first_row : first_row + count, :keys] = step @ self.joint[layer - 1, :keys, :keys]

    def rows(self, rows: Sequence[int], n_tokens: int) -> np.ndarray:
        """``J[rows]`` over the first ``n_tokens`` tokens (the last layer's rollout)."""
        return self.joint[self.n_layers - 1, list(rows), :n_tokens].numpy()


class AnswerRelevancy:
    """Accumulates the relevancy of every generated token while a trace runs its layers.

    Call ``forward_layer`` for each decoder layer in execution order (it also returns the
    rows the store keeps), then ``backward`` once the logits exist. ``rows[k]`` is the query
    row that predicted generated token k; ``n_tokens`` the sequence length.
    """

    def __init__(self, rows: Sequence[int], n_tokens: int, n_layers: int, methods: Sequence[str]) -> None:
        unknown = sorted(set(methods) - set(ANSWER_METHODS))
        if unknown:
            raise VLIError(f"{', '.join(unknown)} cannot explain generated tokens; use {', '.join(ANSWER_METHODS)}")
        if any(not 0 <= row < n_tokens - 1 for row in rows):
            raise VLIError(f"answer rows must lie in 0..{n_tokens - 2}")
        self.rows = torch.as_tensor(list(rows), dtype=torch.long)
        self.n_tokens = n_tokens
        self.n_layers = n_layers
        self.methods = list(methods)
        self.layers: list[LayerAttention] = []
        self.layers_seen = 0
        self.rollout = torch.eye(n_tokens) if "rollout" in methods else None
        self.raw: Tensor | None = None

    @property
    def needs_gradients(self) -> bool:
        return bool(GRADIENT_METHODS & set(self.methods))

    def forward_layer(self, layer: LayerAttention, heads: Sequence[int] | None = None) -> Tensor:
        """Take one layer (in execution order); return its answer rows ``[heads, steps, T]`` of ``heads``."""
        rows = layer.probabilities(self.rows)  # [H, steps, T]
        if self.rollout is not None:
            step = _renormalised(layer.head_mean() + torch.eye(self.n_tokens))
            self.rollout = step @ self.rollout
        self.layers_seen += 1
        if self.layers_seen == self.n_layers:
            self.raw = rows.mean(dim=0)
        if self.needs_gradients:
            self.layers.append(layer)  # its tensors are held by the autograd graph anyway
        return rows if heads is None else rows[torch.as_tensor(list(heads), dtype=torch.long)]

    def backward(
        self, logits: Tensor | None, token_ids: Sequence[int], versus_ids: Sequence[int] | None = None
    ) -> dict[str, np.ndarray]:
        """Each method's ``(steps, T)`` relevancy; ``logits`` ``[steps, vocab]``, the answer rows' logits, in the graph.

        The gradient methods explain ``logits[k, token_ids[k]]`` at step k, or with ``versus_ids`` the
        contrast ``logits[k, token_ids[k]] - logits[k, versus_ids[k]]`` (``relevancy.targets``). Token k's
        row is 0 from its query row on (its own entry, as every read-out, and the tokens not yet generated).
        The graph is kept, so the gradient methods can be run again for another target.
        """
        if self.layers_seen != self.n_layers:
            raise VLIError(f"the trace ran {self.layers_seen} of {self.n_layers} layers")
        steps = len(self.rows)
        values = {method: np.zeros((steps, self.n_tokens), dtype=np.float32) for method in self.methods}
        if "raw_attention" in values and self.raw is not None:
            values["raw_attention"][:] = self.raw.numpy()
        if "rollout" in values and self.rollout is not None:
            values["rollout"][:] = self.rollout[self.rows].numpy()
        if self.needs_gradients:
            if logits is None or not logits.requires_grad:
                raise VLIError("gradient methods need the trace run with gradients enabled")
            outputs = [layer.output for layer in self.layers if layer.output is not None]
            if len(outputs) != self.n_layers:
                raise VLIError("gradient methods need every layer's attention output in the autograd graph")
            steps_index = torch.arange(steps)
            explained = logits[steps_index, torch.as_tensor(list(token_ids), dtype=torch.long)]
            if versus_ids is not None:
                explained = explained - logits[steps_index, torch.as_tensor(list(versus_ids), dtype=torch.long)]
            for step, gradients in enumerate(_step_gradients(explained, outputs)):
                row = int(self.rows[step])
                for method, row_values in self._gradient_rows(row, gradients).items():
                    values[method][step, : row + 1] = row_values
        for step, row in enumerate(self.rows.tolist()):
            for method in values:
                values[method][step, row:] = 0.0
        return values

    def _gradient_rows(self, row: int, gradients: Sequence[Tensor | None]) -> dict[str, np.ndarray]:
        """Grad-CAM and generic rows of one token from its gradients at every layer's attention output."""
        size = row + 1
        relevance = torch.zeros(size, dtype=torch.float64)
        relevance[row] = 1.0
        result: dict[str, np.ndarray] = {}
        for index in reversed(range(self.n_layers)):
            layer, gradient = self.layers[index], gradients[index]
            if gradient is None:
                continue
            # dA = dO V^T per head, over the sequence up to the query row.
            grad_output = gradient.detach().reshape(self.n_tokens, layer.num_heads, -1)[:size].float().transpose(0, 1)
            grad_attention = grad_output @ layer.value[:, :size].detach().float().transpose(-1, -2)
            attention = layer.probabilities(size=size)
            if index == self.n_layers - 1 and "attention_gradcam" in self.methods:
                weights = grad_attention.mean(dim=(1, 2))
                cam = (weights[:, None] * attention[:, row]).mean(dim=0).clamp(min=0)
                result["attention_gradcam"] = cam.numpy()
            if "generic" in self.methods:
                weighted = (grad_attention * attention).clamp(min=0).mean(dim=0).double()
                relevance = relevance + relevance @ weighted
        if "generic" in self.methods:
            result["generic"] = relevance.float().numpy()
        return result
