"""Adapters for the built-in models (``vlinterpret_panel.models``): single_stream, dual_stream, dual_encoder.

Importing this module registers the three names with ``adapters.registry.register_builtin``, so
``load_adapter("single_stream")`` (or ``"builtin:single_stream"``) returns a ``BuiltinAdapter``.

Token layout of a capture, whatever the model's internal streams: the question's (or
caption's) tokens ``[CLS] words [SEP]`` first, then for the dual encoder the image's own
``[CLS]``, then the 16 image patches in row-major order (row 0 at the top). ``[CLS]``,
``[SEP]`` and ``[UNK]`` are ``special`` (as Hugging Face tokenizers treat them), the image
``[CLS]`` too (without a box). The models take 64×64 RGB images; other sizes are resized for
the model by area averaging (PIL's box filter: each model pixel is the mean of the caller's
pixels it covers, so nothing bleeds across a patch border), and each patch's ``token_box`` is
mapped back to the caller's pixels.

Gradients: the models compute ``probs = softmax(scores)`` and multiply it with the values in
the same function, so a slice of ``probs`` is not on the path to the output. With grad
enabled, the adapter intercepts that softmax (a ``TorchFunctionMode``) and hands the model
the per-example maps stacked back, so each example's map is a node of the graph.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from vlinterpret_panel.adapters.base import (
    AttentionCapture,
    BatchedAdapter,
    ForwardCapture,
    HiddenCapture,
    KeepMasks,
)
from vlinterpret_panel.adapters.hf_common import PixelMap, check_image, keep_index
from vlinterpret_panel.adapters.registry import register_builtin
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.models import world
from vlinterpret_panel.models.dual_encoder import DualEncoderModel
from vlinterpret_panel.models.layers import BaseVLModel, VLModelOutput
from vlinterpret_panel.models.registry import (
    BUILTIN_MODELS,
    WEIGHTS_DIR,
    images_to_pixels,
    load_builtin_model,
    weight_paths,
)
from vlinterpret_panel.schema import IMAGE, SPECIAL, TEXT

IMAGE_CLS_TOKEN = "<image_cls>"
# Segments of the capture's token sequence, in order (``VLModelOutput.stream_layout`` names).
SEGMENT_ORDER = ("text", "image_cls", "image")
_SOFTMAX_FUNCTIONS = (torch.Tensor.softmax, torch.softmax, torch.nn.functional.softmax)


class _SoftmaxTap(TorchFunctionMode):
    """Replaces every softmax result ``[B, ...]`` by its per-example tensors stacked back.

    ``per_example[id(result)]`` holds the per-example tensors (graph nodes the model's
    output depends on) of each intercepted call, keyed by the tensor the model received.
    """

    def __init__(self) -> None:
        super().__init__()
        self.per_example: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        result = func(*args, **(kwargs or {}))
        if func in _SOFTMAX_FUNCTIONS and isinstance(result, torch.Tensor) and result.requires_grad:
            examples = result.unbind(0)
            result = torch.stack(examples)
            self.per_example[id(result)] = (result, examples)
        return result


@dataclass(frozen=True)
class _Placement:
    """Where one example's tokens sit: per model stream, the stream rows taken and their capture positions."""

    stream_rows: dict[str, np.ndarray]
    capture_positions: dict[str, np.ndarray]
    stream_lengths: dict[str, int]


def model_pixels(images: Sequence[np.ndarray], size: int, name: str) -> tuple[torch.Tensor, list[PixelMap]]:
    """A built-in model's ``[B, 3, size, size]`` pixels (area-averaged resize), and each image's pixel map."""
    from PIL import Image

    resized, maps = [], []
    for image in images:
        image = check_image(image, name)
        height, width = image.shape[:2]
        if (height, width) != (size, size):
            image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BOX))
        resized.append(image)
        maps.append(PixelMap(width / size, height / size, 0.0, 0.0, width, height))
    return images_to_pixels(resized), maps


class BuiltinAdapter(BatchedAdapter):
    """Adapter for one built-in model: VQA answers (single/dual stream) or an image-text similarity (dual encoder)."""

    batch_keep_rows = True

    def __init__(self, architecture: str, *, weights_dir: str | Path | None = None) -> None:
        if architecture not in BUILTIN_MODELS:
            raise VLIError(f"unknown built-in model {architecture!r}; valid choices: {', '.join(BUILTIN_MODELS)}")
        directory = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
        model, config = load_builtin_model(architecture, directory)
        self.model: BaseVLModel = model
        self.name = architecture
        self.architecture = architecture
        self.is_vqa = architecture != "dual_encoder"
        self.grid_size = config.image_size // config.patch_size
        weights_path, config_path = weight_paths(architecture, directory)
        self.config = {
            "family": "builtin",
            **asdict(config),
            "weights_sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
            "weights_metrics": json.loads(config_path.read_text()).get("metrics", {}),
        }

    def _pixels(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[PixelMap]]:
        """Model pixels ``[B, 3, 64, 64]`` and, per image, the map from model pixels back to the caller's."""
        return model_pixels(images, self.model.config.image_size, self.name)

    def _text_ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``[CLS] words [SEP]`` ids and mask; a text over the model's length is a ``VLIError``."""
        limit = self.model.config.max_text_length
        for text in texts:
            length = len(world.encode(text))
            if length > limit:
                raise VLIError(
                    f"{self.name}: text {text!r} has {length} tokens with [CLS] and [SEP]; the limit is {limit}"
                )
        ids, mask = world.encode_batch(list(texts))
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def _keep(self, keep_tokens: np.ndarray, n_text: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's ``text_keep`` and ``image_keep`` for a keep mask over the unperturbed layout."""
        has_image_cls = not self.is_vqa
        n_tokens = n_text + int(has_image_cls) + self.model.config.num_patches
        kept = keep_index(keep_tokens, n_tokens, self.name)
        if kept[0] != 0:
            raise VLIError(f"{self.name}: keep_tokens must keep the text [CLS] (token 0): the model reads it")
        if has_image_cls and n_text not in kept:
            raise VLIError(f"{self.name}: keep_tokens must keep the image [CLS] (token {n_text}): the model reads it")
        patches = kept[kept >= n_text + int(has_image_cls)] - n_text - int(has_image_cls)
        if self.architecture == "dual_stream" and not len(patches):
            raise VLIError(f"{self.name}: keep_tokens must keep at least one image patch (cross-attention needs keys)")
        return torch.as_tensor(kept[kept < n_text])[None], torch.as_tensor(patches)[None]

    def _kept_rows(
        self, texts: Sequence[str], keep_tokens: np.ndarray | Sequence[np.ndarray]
    ) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """Per pair, its kept text positions (None: all of its text) and kept patches, each ``[1, K]``."""
        rows = [keep_tokens] if isinstance(keep_tokens, np.ndarray) and keep_tokens.ndim == 1 else list(keep_tokens)
        if len(rows) != len(texts):
            raise VLIError(f"{self.name}: keep_tokens needs one mask, or one per pair ({len(texts)}), got {len(rows)}")
        kept = []
        for row, text in zip(rows, texts, strict=True):
            n_text = len(world.encode(text))
            text_keep, image_keep = self._keep(np.asarray(row, bool), n_text)
            kept.append((None if text_keep.shape[1] == n_text else text_keep, image_keep))
        return kept

    def run_examples(
        self,
        images: Sequence[np.ndarray],
        texts: Sequence[str],
        keep_tokens: KeepMasks,
    ) -> list[ForwardCapture]:
        """Run the pairs; ``keep_tokens`` (one mask, or one per pair) deletes tokens, positions kept."""
        return self._by_group(images, texts, keep_tokens, self._captures)

    def outputs(
        self,
        images: Sequence[np.ndarray],
        texts: Sequence[str],
        keep_tokens: KeepMasks = None,
    ) -> list[torch.Tensor]:
        """Each pair's ``ForwardCapture.output`` without building the captures (perturbation tests)."""
        return self._by_group(images, texts, keep_tokens, self._outputs)

    def _by_group(
        self,
        images: Sequence[np.ndarray],
        texts: Sequence[str],
        keep_tokens: KeepMasks,
        run: Callable[[Sequence[np.ndarray], Sequence[str], list | None], list],
    ) -> list:
        """``run`` once per group of pairs keeping equally many patches and text tokens, results in pair order.

        The model takes rectangular kept-token indices; a pair keeping all of its text takes
        every position of the padded batch (padding masked), so the captions scored against one
        set of kept patches share a pass, as do the deletions of one step of one example.
        """
        if len(images) != len(texts):
            raise VLIError(f"{self.name}: {len(images)} images for {len(texts)} texts")
        if keep_tokens is None:
            return run(images, texts, None)
        kept = self._kept_rows(texts, keep_tokens)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (text_keep, image_keep) in enumerate(kept):
            key = (-1 if text_keep is None else text_keep.shape[1], image_keep.shape[1])
            groups.setdefault(key, []).append(index)
        results: list = [None] * len(texts)
        for rows in groups.values():
            group = run([images[r] for r in rows], [texts[r] for r in rows], [kept[r] for r in rows])
            for row, result in zip(rows, group, strict=True):
                results[row] = result
        return results

    def _forward(
        self, images: Sequence[np.ndarray], texts: Sequence[str], kept: list | None
    ) -> tuple[VLModelOutput, _SoftmaxTap, torch.Tensor, list[PixelMap]]:
        """One model pass over pairs of one keep group: the output, the softmax tap, the ids, the pixel maps."""
        pixels, pixel_maps = self._pixels(images)
        text_ids, text_mask = self._text_ids(texts)
        text_keep = image_keep = None
        if kept is not None:
            if kept[0][0] is not None:
                text_keep = torch.cat([t for t, _ in kept])
            image_keep = torch.cat([i for _, i in kept])
        tap = _SoftmaxTap()
        if torch.is_grad_enabled():
            with tap:
                output = self.model(text_ids, text_mask, pixels, text_keep=text_keep, image_keep=image_keep)
        else:
            output = self.model(text_ids, text_mask, pixels, text_keep=text_keep, image_keep=image_keep)
        return output, tap, text_ids, pixel_maps

    def _captures(self, images: Sequence[np.ndarray], texts: Sequence[str], kept: list | None) -> list[ForwardCapture]:
        output, tap, text_ids, pixel_maps = self._forward(images, texts, kept)
        return [self._capture(output, tap, text_ids, example, pixel_maps[example]) for example in range(len(texts))]

    def _outputs(self, images: Sequence[np.ndarray], texts: Sequence[str], kept: list | None) -> list[torch.Tensor]:
        logits = self._forward(images, texts, kept)[0].logits
        if self.is_vqa:
            return list(logits)
        return [logits[example, example].reshape(1) for example in range(len(texts))]

    def _placement(self, output: VLModelOutput, example: int) -> _Placement:
        """Which rows of each model stream are this example's real tokens, and where they go in the capture."""
        real_text = output.text_mask[example].numpy()
        n_text = int(real_text.sum())
        segment_real = {
            "text": real_text,
            "image_cls": np.ones(1, bool),
            "image": np.ones(output.image_positions.shape[1], bool),
        }
        segments = {s for layout in output.stream_layout.values() for s in layout}
        offset, capture_start = 0, {}
        for segment in SEGMENT_ORDER:
            if segment in segments:
                capture_start[segment] = offset
                offset += n_text if segment == "text" else len(segment_real[segment])
        rows, positions, lengths = {}, {}, {}
        for stream, layout in output.stream_layout.items():
            stream_rows, capture_positions, start = [], [], 0
            for segment in layout:
                real = segment_real[segment]
                stream_rows.append(start + np.flatnonzero(real))
                capture_positions.append(capture_start[segment] + np.arange(int(real.sum())))
                start += len(real)
            rows[stream], positions[stream] = np.concatenate(stream_rows), np.concatenate(capture_positions)
            lengths[stream] = start
        return _Placement(rows, positions, lengths)

    @staticmethod
    def _example_map(probs: torch.Tensor, tap: _SoftmaxTap, example: int) -> torch.Tensor:
        """Example ``example``'s ``[heads, q, k]`` map: the graph node when the tap recorded it, else a slice."""
        if id(probs) in tap.per_example:
            return tap.per_example[id(probs)][1][example]
        if probs.requires_grad:
            raise VLIError("an attention map was not captured in the autograd graph; gradients would be wrong")
        return probs[example]

    def _capture(
        self, output: VLModelOutput, tap: _SoftmaxTap, text_ids: torch.Tensor, example: int, pixel_map: PixelMap
    ) -> ForwardCapture:
        """One example's capture, cut out of the (possibly padded) batch."""
        place = self._placement(output, example)
        attentions = []
        for module in output.attentions:
            probs = self._example_map(module.probs, tap, example)
            rows = place.stream_rows[module.query_stream]
            cols = place.stream_rows[module.key_stream]
            if len(rows) != place.stream_lengths[module.query_stream]:
                probs = probs[:, torch.as_tensor(rows)]
            if len(cols) != place.stream_lengths[module.key_stream]:
                probs = probs[:, :, torch.as_tensor(cols)]
            attentions.append(
                AttentionCapture(
                    name=module.name,
                    kind=module.kind,
                    probabilities=probs,
                    query_tokens=place.capture_positions[module.query_stream].tolist(),
                    key_tokens=place.capture_positions[module.key_stream].tolist(),
                )
            )
        hidden = [
            HiddenCapture(
                name=name,
                states=torch.cat(
                    [
                        output.hidden_states[stream][index][example, torch.as_tensor(place.stream_rows[stream])]
                        for stream, index in indices.items()
                    ]
                ),
                token_indices=np.concatenate([place.capture_positions[stream] for stream in indices]).tolist(),
            )
            for name, indices in self._hidden_stages()
        ]
        kept_ids = text_ids[example, output.text_positions[example]][output.text_mask[example]].tolist()
        patch_indices = output.image_positions[example].numpy()
        tokens = [world.VOCAB[i] for i in kept_ids]
        modality = [SPECIAL if token in world.SPECIAL_TOKENS else TEXT for token in tokens]
        if "image_cls" in output.stream_layout.get("image", ()):
            tokens.append(IMAGE_CLS_TOKEN)
            modality.append(SPECIAL)
        patch_grid = np.stack(np.divmod(patch_indices, self.grid_size), axis=1).reshape(-1, 2)
        tokens += [f"<patch_{row}_{col}>" for row, col in patch_grid]
        modality += [IMAGE] * len(patch_grid)
        first_patch = len(tokens) - len(patch_grid)
        patch_position = np.full((len(tokens), 2), -1, np.int16)
        patch_position[first_patch:] = patch_grid
        token_box = np.full((len(tokens), 4), np.nan, np.float32)
        patch_size = self.model.config.patch_size
        token_box[first_patch:] = pixel_map.patch_boxes(patch_grid, patch_size, patch_size)
        score_captions = None
        if self.is_vqa:
            scores, labels, readouts = output.logits[example], list(world.ANSWERS), {"answer": 0}
        else:
            n_text = int(output.text_mask[example].sum())
            scores, labels, readouts = output.logits[example, example].reshape(1), None, {"text": 0, "image": n_text}
            score_captions = self._caption_scorer(output, example)
        return ForwardCapture(
            tokens=tokens,
            modality=modality,
            token_box=token_box,
            attentions=attentions,
            hidden_states=hidden,
            output=scores,
            output_labels=labels,
            readout_tokens=readouts,
            patch_position=patch_position,
            score_captions=score_captions,
        )

    def _caption_scorer(self, output: VLModelOutput, example: int) -> Callable[[Sequence[str]], torch.Tensor]:
        """The dual encoder's scores of ``example``'s image (its embedding, in the graph) against other captions."""
        assert output.image_embeds is not None  # the dual encoder's output carries them
        image_embeds = output.image_embeds[example : example + 1]
        model = cast(DualEncoderModel, self.model)

        def score(captions: Sequence[str]) -> torch.Tensor:
            ids, mask = self._text_ids(captions)
            return model.caption_similarity(image_embeds, ids, mask)[0]

        return score

    def _hidden_stages(self) -> list[tuple[str, dict[str, int]]]:
        """Hidden-state stages in execution order: name, and the index into each updated stream's list."""
        config = self.model.config
        if self.architecture == "single_stream":
            return [("embeddings", {"joint": 0})] + [
                (f"layers.{i}", {"joint": i + 1}) for i in range(config.num_layers)
            ]
        stages = [("embeddings", {"text": 0, "image": 0})]
        text_layers, image_layers = (
            (config.num_layers, config.num_layers)
            if self.architecture == "dual_encoder"
            else (config.num_text_layers, config.num_image_layers)
        )
        stages += [(f"text_layers.{i}", {"text": i + 1}) for i in range(text_layers)]
        stages += [(f"image_layers.{i}", {"image": i + 1}) for i in range(image_layers)]
        if self.architecture == "dual_stream":
            stages += [
                (f"cross_layers.{i}", {"text": text_layers + i + 1, "image": image_layers + i + 1})
                for i in range(config.num_cross_layers)
            ]
        return stages


def _factory(architecture: str) -> Any:
    def build(**options: Any) -> BuiltinAdapter:
        return BuiltinAdapter(architecture, **options)

    return build


for _name in BUILTIN_MODELS:
    register_builtin(_name, _factory(_name))


def _generative_factory(**options: Any) -> Any:
    from vlinterpret_panel.adapters.builtin_generative import BuiltinGenerativeAdapter

    return BuiltinGenerativeAdapter(**options)


register_builtin("generative", _generative_factory)
