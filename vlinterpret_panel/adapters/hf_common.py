"""What the Hugging Face adapters share: loading, token labels, pixel geometry, attention taps.

Attention capture must keep each example's ``[heads, queries, keys]`` map *in* the autograd
graph, so that ``ModelAdapter.run(..., gradients=True)`` can differentiate the target with
respect to it. A slice of a returned ``[batch, heads, q, k]`` tensor is not on the path to
the output, so an ``AttentionTap`` splits the probabilities into per-example tensors and
stacks them back *before* the model multiplies them with the values. Models whose attention
code runs its dropout as a module (ViLT, LXMERT) are tapped with a forward hook on that
module; models built on the ``AttentionInterface`` (CLIP, Llama/LLaVA) get an eager
attention function registered under ``CAPTURE_ATTENTION``, which records the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vlinterpret_panel.adapters.base import AttentionCapture, HiddenCapture
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import IMAGE, SPECIAL, TEXT

CAPTURE_ATTENTION = "vlinterpret_capture"


class AttentionTap:
    """Records attention probabilities call by call, one graph-connected tensor per example."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor | Sequence[torch.Tensor]] = []
        self.modules: list[nn.Module] = []

    def record(self, probabilities: torch.Tensor, module: nn.Module) -> torch.Tensor:
        """Store ``probabilities`` ``[batch, heads, q, k]`` computed by ``module``; return the
        tensor the model must go on with."""
        self.modules.append(module)
        if not torch.is_grad_enabled():
            self.calls.append(probabilities)
            return probabilities
        per_example = probabilities.unbind(0)
        self.calls.append(per_example)
        return torch.stack(per_example)

    def calls_of(self, modules: Sequence[nn.Module]) -> list[int]:
        """Indices of the calls made by ``modules``, in call order (a module may be called twice)."""
        wanted = {id(m) for m in modules}
        return [i for i, m in enumerate(self.modules) if id(m) in wanted]


_ACTIVE_TAP: contextvars.ContextVar[AttentionTap | None] = contextvars.ContextVar("vli_attention_tap", default=None)


@contextlib.contextmanager
def tapping(dropout_modules: Sequence[nn.Module] = ()) -> Iterator[AttentionTap]:
    """Capture attention during the ``with`` block: via ``CAPTURE_ATTENTION``, and via hooks
    on the given attention-dropout modules (whose input is the post-softmax probabilities)."""
    tap = AttentionTap()
    token = _ACTIVE_TAP.set(tap)

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        # Hooks are shared by all threads; record only this thread's (context's) calls.
        return tap.record(output, module) if _ACTIVE_TAP.get() is tap else output

    try:
        with forward_hooks(*((module, hook) for module in dropout_modules)):
            yield tap
    finally:
        _ACTIVE_TAP.reset(token)


@contextlib.contextmanager
def forward_hooks(*hooks: tuple[nn.Module, Callable[..., Any]], pre_with_kwargs: bool = False) -> Iterator[None]:
    """Forward hooks ``(module, hook)`` registered for the ``with`` block only (removed even on error).

    ``pre_with_kwargs`` registers forward *pre*-hooks that see and may replace ``(args, kwargs)``.
    """
    handles = [
        module.register_forward_pre_hook(hook, with_kwargs=True)
        if pre_with_kwargs
        else module.register_forward_hook(hook)
        for module, hook in hooks
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (as transformers' ``eager``), recording the probabilities in the active tap."""
    groups = int(getattr(module, "num_key_value_groups", 1))
    if groups > 1:  # grouped-query attention: each key/value head serves ``groups`` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    # Like eager: softmax in float32 for half precision; float64 models keep float64 (for exact checks).
    softmax_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    probabilities = nn.functional.softmax(scores, dim=-1, dtype=softmax_dtype).to(query.dtype)
    probabilities = nn.functional.dropout(probabilities, p=dropout, training=module.training)
    tap = _ACTIVE_TAP.get()
    if tap is not None:
        probabilities = tap.record(probabilities, module)
    output = torch.matmul(probabilities, value).transpose(1, 2).contiguous()
    return output, probabilities


def register_capture_attention() -> str:
    """Register ``CAPTURE_ATTENTION`` with transformers (idempotent); return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(CAPTURE_ATTENTION, capture_attention_forward)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    return CAPTURE_ATTENTION


def use_capture_attention(model: nn.Module) -> None:
    """Switch every sub-model of ``model`` to the capturing eager attention."""
    register_capture_attention()
    model.set_attn_implementation(CAPTURE_ATTENTION)  # type: ignore[operator]  # nn.Module's __getattr__ hides it


ALLOW_DOWNLOAD_VARIABLE = "VLINTERPRET_ALLOW_DOWNLOAD"
"""Set to 1 (the CLI's ``--allow-download``) to let a Hub name that is not in the local cache be downloaded."""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def downloads_allowed() -> bool:
    """Whether checkpoints may come from the Hugging Face Hub (off by default: offline first)."""
    return not _hub_offline() and os.environ.get(ALLOW_DOWNLOAD_VARIABLE, "0") in ("1", "true", "True", "yes")


def load_pretrained(loader: Callable[..., Any], name_or_path: str, what: str, **kwargs: Any) -> Any:
    """``loader(name_or_path)`` with a readable ``VLIError`` when the checkpoint is missing.

    Offline first: a local directory, or a Hub name already in the local Hugging Face cache,
    loads at once; anything else fails at once naming what was looked for, without the Hub's
    retries (28 s of "Retrying" before), unless downloads are allowed (``downloads_allowed``).
    """
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))
    if looks_local and not os.path.exists(os.path.expanduser(name_or_path)):
        raise VLIError(f"cannot load the {what} {name_or_path!r}: no such file or directory")
    allowed = downloads_allowed()
    if not allowed:
        kwargs.setdefault("local_files_only", True)
    try:
        return loader(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        if not allowed and not os.path.isdir(os.path.expanduser(name_or_path)):
            from huggingface_hub.constants import HF_HUB_CACHE

            how = (
                "unset HF_HUB_OFFLINE and pass --allow-download"
                if _hub_offline()
                else "pass --allow-download (or set VLINTERPRET_ALLOW_DOWNLOAD=1)"
            )
            raise VLIError(
                f"cannot load the {what} {name_or_path!r}: it is not a local directory nor in the Hugging Face "
                f"cache ({HF_HUB_CACHE}); {how} to fetch it from the Hub"
            ) from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VLIError(f"cannot load the {what} {name_or_path!r}: {reason}") from None


def model_options(options: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` keywords from adapter options: ``dtype`` ("float32", "bfloat16", ...)."""
    dtype = options.get("dtype")
    if dtype is None:
        return {}
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise VLIError(f"dtype={dtype!r}: use a torch dtype name such as float32, bfloat16 or float16")
    return {"dtype": getattr(torch, str(dtype))}


def load_model_and_processor(
    model_class: Any,
    processor_class: Any,
    name_or_path: str,
    family: str,
    options: dict[str, Any],
    part: str = "processor",
) -> tuple[Any, Any]:
    """A checkpoint's model (in the ``dtype`` option, if given) and its processor or tokenizer (``part``).

    Errors name the family and the part that failed, e.g. "cannot load the ViLT processor ...".
    """
    model = load_pretrained(model_class.from_pretrained, name_or_path, f"{family} model", **model_options(options))
    processor = load_pretrained(processor_class.from_pretrained, name_or_path, f"{family} {part}")
    return model, processor


def token_labels(tokenizer: Any, ids: Sequence[int]) -> tuple[list[str], list[str]]:
    """Token strings and their modality (``special`` for the tokenizer's special ids, else ``text``)."""
    special_ids = set(tokenizer.all_special_ids)
    ids = [int(i) for i in ids]
    strings = [str(s) for s in tokenizer.convert_ids_to_tokens(ids)]
    return strings, [SPECIAL if i in special_ids else TEXT for i in ids]


def image_token_labels(positions: np.ndarray) -> tuple[list[str], list[str]]:
    """Names and modality of image tokens; a position of (-1, -1) is the image's [CLS]-like token."""
    names, modality = [], []
    for row, col in positions:
        if row < 0:
            names.append("<image_cls>")
            modality.append(SPECIAL)
        else:
            names.append(f"<patch_{int(row)}_{int(col)}>")
            modality.append(IMAGE)
    return names, modality


def _size_value(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


def _required_size(size: Any, key: str) -> int:
    value = _size_value(size, key)
    if value is None:
        raise VLIError(f"the image processor's size {size!r} has no {key!r}")
    return value


@dataclass(frozen=True)
class PixelMap:
    """Maps pixels of the processed image back to the user's image: ``x = x' * scale_x + offset_x``."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    width: int
    height: int

    def patch_boxes(self, positions: np.ndarray, patch_height: int, patch_width: int) -> np.ndarray:
        """Pixel boxes ``(x0, y0, x1, y1)`` on the user's image of patches at (row, col) ``positions``.

        Rows with a negative position (no patch) get NaN; boxes are clipped to the image, so a
        patch that lies in padding added by the processor has zero area.
        """
        positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        rows, cols = positions[:, 0], positions[:, 1]
        boxes = np.stack(
            [
                cols * patch_width * self.scale_x + self.offset_x,
                rows * patch_height * self.scale_y + self.offset_y,
                (cols + 1) * patch_width * self.scale_x + self.offset_x,
                (rows + 1) * patch_height * self.scale_y + self.offset_y,
            ],
            axis=1,
        )
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, self.width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, self.height)
        boxes[rows < 0] = np.nan
        return boxes.astype(np.float32)


def clip_style_pixel_map(image_processor: Any, height: int, width: int) -> PixelMap:
    """The geometry of CLIP-style preprocessing: optional pad to square, resize, center crop."""
    from transformers.image_transforms import get_resize_output_image_size

    pad_top = pad_left = 0
    if getattr(image_processor, "do_pad", False) and hasattr(image_processor, "pad_to_square"):
        side = max(height, width)
        pad_top, pad_left = (side - height) // 2, (side - width) // 2
        padded_height = padded_width = side
    else:
        padded_height, padded_width = height, width
    resized_height, resized_width = padded_height, padded_width
    if getattr(image_processor, "do_resize", True):
        size = image_processor.size
        shortest = _size_value(size, "shortest_edge")
        if shortest:
            resized_height, resized_width = get_resize_output_image_size(
                np.zeros((3, padded_height, padded_width)),
                size=shortest,
                default_to_square=False,
                input_data_format="channels_first",
            )
        else:
            resized_height, resized_width = _required_size(size, "height"), _required_size(size, "width")
    crop_top = crop_left = 0
    if getattr(image_processor, "do_center_crop", False):
        crop = image_processor.crop_size
        crop_top = (resized_height - _required_size(crop, "height")) // 2
        crop_left = (resized_width - _required_size(crop, "width")) // 2
    scale_y, scale_x = padded_height / resized_height, padded_width / resized_width
    return PixelMap(
        scale_x=scale_x,
        scale_y=scale_y,
        offset_x=crop_left * scale_x - pad_left,
        offset_y=crop_top * scale_y - pad_top,
        width=width,
        height=height,
    )


def check_image(image: np.ndarray, adapter: str) -> np.ndarray:
    """The image as uint8 ``(height, width, 3)``, or a ``VLIError`` saying what is wrong."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise VLIError(f"{adapter}: images must be uint8 (height, width, 3), got {image.dtype} {image.shape}")
    return image


def keep_index(keep_tokens: np.ndarray | None, n_tokens: int, adapter: str) -> np.ndarray:
    """Indices of the tokens kept by the boolean mask ``keep_tokens`` (all when None)."""
    if keep_tokens is None:
        return np.arange(n_tokens)
    keep = np.asarray(keep_tokens, dtype=bool)
    if keep.shape != (n_tokens,):
        raise VLIError(f"{adapter}: keep_tokens needs one flag per token ({n_tokens}), got shape {keep.shape}")
    if not keep.any():
        raise VLIError(f"{adapter}: keep_tokens keeps no token")
    return np.flatnonzero(keep)


def example_maps(tap: AttentionTap, call: int, example: int, index: torch.Tensor | None) -> torch.Tensor:
    """Example ``example``'s ``[heads, q, k]`` map of tap call ``call``, restricted to ``index``.

    Without restriction the returned tensor is the graph-connected one (gradients flow);
    restricted maps are slices, for runs without gradients.
    """
    maps = tap.calls[call][example]
    if index is None:
        return maps
    return maps.index_select(1, index).index_select(2, index)


def layer_attentions(
    tap: AttentionTap,
    calls: Sequence[int],
    example: int,
    index: torch.Tensor | None,
    *,
    name: str,
    kind: str,
    tokens: Sequence[int],
) -> list[AttentionCapture]:
    """One ``AttentionCapture`` per layer of a stack whose layers attend over the same ``tokens``.

    ``calls[layer]`` is the layer's tap call; ``name`` is formatted with ``layer``; ``index``
    restricts the maps to the example's real tokens as in ``example_maps``.
    """
    return [
        AttentionCapture(
            name=name.format(layer=layer),
            kind=kind,
            probabilities=example_maps(tap, call, example, index),
            query_tokens=tokens,
            key_tokens=tokens,
        )
        for layer, call in enumerate(calls)
    ]


def stage_hidden_states(
    hidden_states: Sequence[torch.Tensor],
    example: int,
    index: torch.Tensor | None,
    *,
    layer_name: str,
    tokens: Sequence[int],
) -> list[HiddenCapture]:
    """The example's hidden states after the embeddings and after each layer of a single-sequence stack.

    ``hidden_states`` is transformers' tuple (embeddings first); ``layer_name`` is formatted
    with ``layer``; ``index`` selects the example's real tokens (None: all of them).
    """
    return [
        HiddenCapture(
            name="embeddings" if stage == 0 else layer_name.format(layer=stage - 1),
            states=states[example] if index is None else states[example, index],
            token_indices=tokens,
        )
        for stage, states in enumerate(hidden_states)
    ]
