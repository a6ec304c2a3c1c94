"""Tiny Hugging Face models with random weights and real processors from a small local vocabulary.

Nothing is downloaded: every model is built from a config object, every tokenizer from files
written into a test directory. ``save_tiny_*`` write a checkpoint directory, the form in which
a user passes a model to ``load_adapter`` and ``vlinterpret extract``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

WORDS = (
    "what color is the a shape square circle triangle red blue green yellow left right of how many "
    "there are in image ? picture photo big small"
).split()
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ANSWERS = ["yes", "no", "red", "blue", "green"]


def bert_tokenizer(directory: Path) -> transformers.PreTrainedTokenizerBase:
    """A BERT WordPiece tokenizer over ``WORDS``, from a vocab file in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(BERT_SPECIALS + WORDS) + "\n")
    return transformers.BertTokenizerFast(vocab=str(vocab))


def clip_tokenizer(directory: Path) -> transformers.PreTrainedTokenizerBase:
    """A CLIP byte-level BPE tokenizer with whole-word entries for ``WORDS`` (no merges needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    byte_vocab = bytes_to_unicode()
    symbols = list(byte_vocab.values()) + [s + "</w>" for s in byte_vocab.values()]
    merges = []
    for word in WORDS:
        if len(word) > 1 and word.isalpha():
            pieces = [*word[:-1], word[-1] + "</w>"]
            while len(pieces) > 1:
                merges.append(f"{pieces[0]} {pieces[1]}")
                pieces = [pieces[0] + pieces[1], *pieces[2:]]
                symbols.append(pieces[0])
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(symbols))}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    merge_lines = (directory / "merges.txt").read_text().splitlines()[1:]
    return transformers.CLIPTokenizer(
        vocab=json.loads((directory / "vocab.json").read_text()), merges=[tuple(m.split()) for m in merge_lines if m]
    )


def tiny_vilt(directory: Path, *, seed: int = 0) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """ViltForQuestionAnswering: 2 layers, 4 heads, 16-pixel patches, images resized to a 64-pixel short side."""
    torch.manual_seed(seed)
    tokenizer = bert_tokenizer(directory / "tokenizer")
    image_processor = transformers.ViltImageProcessor(size={"shortest_edge": 64}, size_divisor=16, resample=0)
    processor = transformers.ViltProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = transformers.ViltConfig(
        vocab_size=len(BERT_SPECIALS) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=64,
        patch_size=16,
        max_position_embeddings=40,
        num_labels=len(ANSWERS),
        id2label=dict(enumerate(ANSWERS)),
        label2id={a: i for i, a in enumerate(ANSWERS)},
    )
    return transformers.ViltForQuestionAnswering(config).eval(), processor


def save_tiny_vilt(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny ViLT checkpoint (model + processor) to ``directory``; return it."""
    model, processor = tiny_vilt(directory / "build", seed=seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def scene(height: int, width: int, seed: int) -> np.ndarray:
    """A small test image: a gradient with one coloured rectangle."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    image[...] = np.linspace(20, 120, width, dtype=np.uint8)[None, :, None]
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[top : top + height // 3, left : left + width // 3] = rng.integers(120, 255, 3)
    return image


def tiny_clip(directory: Path, *, seed: int = 0) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """CLIPModel: text width 24, vision width 32 (so the towers differ), 8-pixel patches on a 32-pixel crop."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(directory / "tokenizer")
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=0
    )
    processor = transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text_config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = transformers.CLIPConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=16
    )
    return transformers.CLIPModel(config).eval(), processor


REGION_FEATURES = 12


def grid_regions(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stand-in for a detector: 2x3 grid cells as regions, features from each cell's mean colour."""
    height, width = image.shape[:2]
    projection = np.random.default_rng(0).normal(size=(3, REGION_FEATURES)).astype(np.float32)
    features, boxes = [], []
    for row in range(2):
        for col in range(3):
            cell = image[row * height // 2 : (row + 1) * height // 2, col * width // 3 : (col + 1) * width // 3]
            features.append(cell.reshape(-1, 3).mean(0) / 255 @ projection)
            boxes.append([col / 3, row / 2, (col + 1) / 3, (row + 1) / 2])
    return np.array(features, np.float32), np.array(boxes, np.float32)


def tiny_lxmert(
    directory: Path, *, seed: int = 0
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """LxmertForQuestionAnswering: 2 language, 1 relational, 2 cross layers, 4 heads, 12-dim region features."""
    torch.manual_seed(seed)
    tokenizer = bert_tokenizer(directory / "tokenizer")
    config = transformers.LxmertConfig(
        vocab_size=len(BERT_SPECIALS) + len(WORDS),
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        l_layers=2,
        r_layers=1,
        x_layers=2,
        visual_feat_dim=REGION_FEATURES,
        max_position_embeddings=40,
        num_qa_labels=len(ANSWERS),
        num_object_labels=4,
        num_attr_labels=4,
    )
    return transformers.LxmertForQuestionAnswering(config).eval(), tokenizer


LLAVA_WORDS = ["USER", "ASSISTANT", ":", *WORDS]


def word_tokenizer(directory: Path) -> transformers.PreTrainedTokenizerBase:
    """A word-level tokenizer with BOS and an ``<image>`` special token (a stand-in for Llama's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + LLAVA_WORDS)}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    backend = Tokenizer(models.WordLevel(json.loads((directory / "vocab.json").read_text()), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=["<image>"],
    )


def llava_processor(
    directory: Path, *, image_size: int, patch_size: int, **image_options: object
) -> transformers.LlavaProcessor:
    """A LLaVA-1.5 processor (CLIP image processor, the word tokenizer) for ``image_size`` square images."""
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, **image_options
    )
    return transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=word_tokenizer(directory / "tokenizer"),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def tiny_llava(directory: Path, *, seed: int = 0) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """LlavaForConditionalGeneration: 2-layer CLIP vision tower (4x4 patches), 2-layer Llama with grouped KV heads."""
    torch.manual_seed(seed)
    processor = llava_processor(directory, image_size=32, patch_size=8, resample=0)
    tokenizer = processor.tokenizer
    vision_config = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    text_config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = transformers.LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-1,
    )
    return transformers.LlavaForConditionalGeneration(config).eval(), processor


QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def qwen_tokenizer(directory: Path) -> transformers.PreTrainedTokenizerBase:
    """A word-level tokenizer with Qwen2-VL's chat and vision special tokens (a stand-in for Qwen2's BPE)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["<unk>", *QWEN_SPECIALS, "user", "assistant", *WORDS])}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    backend = Tokenizer(models.WordLevel(json.loads((directory / "vocab.json").read_text()), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=QWEN_SPECIALS[1:],
    )


class ImageOnlyQwen2VLProcessor(transformers.Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor, which needs torchvision (not installed here).

    Images go through the real ``Qwen2VLImageProcessorPil`` and the real ``__call__`` (which
    expands ``<|image_pad|>`` to the image's token count); only the unused video half is left out.
    """

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


def tiny_qwen2vl(directory: Path, *, seed: int = 0) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """Qwen2VLForConditionalGeneration: 2-block vision tower (4-pixel patches, 2x2 merge), 2-layer decoder, M-RoPE."""
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer(directory / "tokenizer")
    image_processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48}
    )
    processor = ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    config = transformers.Qwen2VLConfig(
        vision_config={
            "depth": 2,
            "embed_dim": 16,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": None,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return transformers.Qwen2VLForConditionalGeneration(config).eval(), processor


def tiny_decoder_adapter(family: str, directory: str, seed: int = 0) -> object:
    """A generative adapter over a tiny LLaVA or Qwen2-VL, for ``load_adapter("py:hf_tiny:tiny_decoder_adapter")``."""
    from vlinterpret_panel.adapters.hf_llava import LlavaAdapter
    from vlinterpret_panel.adapters.hf_qwen2vl import Qwen2VLAdapter

    if family == "llava":
        return LlavaAdapter(*tiny_llava(Path(directory), seed=seed), name="tiny-llava")
    return Qwen2VLAdapter(*tiny_qwen2vl(Path(directory), seed=seed), name="tiny-qwen2-vl")
