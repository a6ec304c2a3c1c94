"""The built-in generative model (LLaVA-like): it answers the world's questions and describes scenes in words.

Architecture, as LLaVA's at toy size: the 64x64 image is cut into 16 patches (16x16 pixels,
row-major, row 0 at the top), each embedded linearly with its 2-D grid position (the "vision
encoder") and mapped by a two-layer MLP **projector** into the language model's space (the
shipped configuration, ``extract/train_models.GENERATIVE_CONFIG``, projects the raw patch pixels
through a 512-wide MLP and adds the grid position in the decoder's space instead); a
**causal decoder** (pre-LN blocks from ``layers``, each position sees itself and the positions
before it, image tokens included) runs over::

    [BOS] <16 image tokens> <prompt words> [SEP] <answer words> [EOS]

image tokens first, as in LLaVA, and a linear head predicts the next token at every position.
Text tokens (``[BOS]`` and everything after the image) carry the position embedding of their
index in ``input_ids``; image tokens that of their patch. Deleting tokens (``image_keep`` /
``text_keep``) therefore leaves the remaining ones' positions unchanged, as
``BaseVLModel.select_tokens`` does for the other built-in models.

The tokenizer is here (``encode_prompt``, ``encode_answer``, ``token_strings``, ``decode``) over
the world's ``GENERATIVE_VOCAB``; prompts, reference descriptions, scoring and ground-truth
masks are the world's (``world.generative_example_for_seed``, ``world.describe_scene``,
``world.description_correct``, ``world.answer_correct``, ``world.generated_token_masks``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from vlinterpret_panel.models import world
from vlinterpret_panel.models.layers import (
    PatchEmbedding,
    SelfAttentionBlock,
    TextEmbedding,
    gather_tokens,
    grid_position_table,
    init_weights,
    keep_index,
    pixels_from_uint8,
)

VOCAB: tuple[str, ...] = world.GENERATIVE_VOCAB
"""The model's vocabulary: the VQA models' ``world.VOCAB`` (same ids) followed by its own words."""
TOKEN_TO_ID: dict[str, int] = world.GENERATIVE_TOKEN_TO_ID
SPECIAL_TOKENS: tuple[str, ...] = world.GENERATIVE_SPECIAL_TOKENS
PAD_ID, SEP_ID, UNK_ID = world.PAD_ID, world.SEP_ID, world.UNK_ID
BOS_ID, EOS_ID = TOKEN_TO_ID[world.BOS_TOKEN], TOKEN_TO_ID[world.EOS_TOKEN]
_TOKEN_PATTERN = re.compile(r"\[(?:pad|cls|sep|unk|bos|eos)\]|[a-z0-9]+|[^\sa-z0-9]")

MODALITIES: tuple[str, ...] = ("text", "image", "special", "pad")
"""Codes of ``SequenceLayout.modality`` (the order of ``schema.MODALITIES``)."""
TEXT, IMAGE, SPECIAL, PAD = range(len(MODALITIES))
MAX_NEW_TOKENS = 32
"""Enough for the longest answer: four objects described (31 words) and ``[EOS]``."""
_SPECIAL_IDS = torch.tensor([TOKEN_TO_ID[token] for token in SPECIAL_TOKENS])


def tokenize(text: str) -> list[str]:
    """Lowercase and split like ``world.tokenize``, into ``VOCAB`` (unknown words become ``[UNK]``)."""
    tokens = [
        token.upper() if token.startswith("[") and len(token) > 1 else token
        for token in _TOKEN_PATTERN.findall(text.lower())
    ]
    return [token if token in TOKEN_TO_ID else world.UNK_TOKEN for token in tokens]


def encode_prompt(text: str) -> list[int]:
    """Ids ``[BOS] words [SEP]`` of a prompt (a question or ``world.DESCRIBE_PROMPT``): what the model reads first."""
    return [BOS_ID, *(TOKEN_TO_ID[token] for token in tokenize(text)), SEP_ID]


def encode_answer(text: str) -> list[int]:
    """Ids ``words [EOS]`` of an answer or description: what the model should generate after the prompt."""
    return [*(TOKEN_TO_ID[token] for token in tokenize(text)), EOS_ID]


def token_strings(ids: Sequence[int] | np.ndarray | Tensor) -> list[str]:
    """The ``VOCAB`` string of each id, special tokens included."""
    return [VOCAB[int(i)] for i in ids]


def decode(ids: Sequence[int] | np.ndarray | Tensor) -> str:
    """The text of generated ids: their words up to the first ``[EOS]``, without special tokens."""
    words = []
    for token in token_strings(ids):
        if token == world.EOS_TOKEN:
            break
        if token not in SPECIAL_TOKENS:
            words.append(token)
    return " ".join(words)


@dataclass
class GenerativeConfig:
    """Sizes of the generative model; saved as JSON beside its weights like ``ModelConfig``."""

    architecture: str = "generative"
    hidden_size: int = 128
    num_heads: int = 4
    intermediate_size: int = 512
    num_layers: int = 4
    image_size: int = 64
    patch_size: int = 16
    vocab_size: int = len(VOCAB)
    max_text_length: int = 40
    image_positions_in_decoder: bool = False
    projector_on_pixels: bool = False
    projector_hidden_size: int = 128

    @property
    def num_patches(self) -> int:
        """Number of image tokens (patches) of a full image."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class SequenceLayout:
    """Where each position of a forward pass's sequence comes from.

    The sequence is ``[BOS]`` (text index 0), the kept image patches, then the other kept text
    tokens. Per position ``[B, L]``: ``modality`` (codes into ``MODALITIES``: a word of the prompt
    or answer, an image patch, a special token such as ``[BOS]``/``[SEP]``/``[EOS]``/``[UNK]``,
    or padding) and ``source_index`` (the patch index, row-major with row 0 at the top, for
    image positions; the index into ``input_ids`` for all others). ``text_positions`` ``[B, Kt]``
    and ``image_positions`` ``[B, Ki]`` list the kept text indices and patches in sequence
    order; ``sequence_mask`` ``[B, L]`` is True at real (not padding) positions;
    ``last_position`` ``[B]`` is each example's last real position, whose logits predict the
    next token.
    """

    modality: Tensor
    source_index: Tensor
    text_positions: Tensor
    image_positions: Tensor
    sequence_mask: Tensor
    last_position: Tensor

    @property
    def num_image_tokens(self) -> int:
        """Number of image tokens in the sequence (positions ``1 .. num_image_tokens``)."""
        return int(self.image_positions.shape[1])

    def text_sequence_positions(self) -> Tensor:
        """``[Kt]``: the sequence position of each kept text token (``[BOS]`` at 0, the rest after the image)."""
        count = self.text_positions.shape[1]
        rest = torch.arange(1, count, device=self.text_positions.device) + self.num_image_tokens
        return torch.cat([torch.zeros(1, dtype=torch.long, device=rest.device), rest])


@dataclass
class GenerativeOutput:
    """A forward pass.

    - ``logits`` ``[B, L, V]``: next-token logits at every sequence position.
    - ``attentions``: one ``[B, heads, L, L]`` per decoder layer, the post-softmax
      probabilities exactly as they mix the values (in the autograd graph; masked keys,
      future positions and padding, are exactly 0).
    - ``hidden_states``: ``[B, L, D]`` after the embeddings (image tokens after the
      projector), then after each decoder block.
    - ``layout``: what each position is (``SequenceLayout``).
    """

    logits: Tensor
    attentions: list[Tensor]
    hidden_states: list[Tensor]
    layout: SequenceLayout

    def next_token_logits(self) -> Tensor:
        """``[B, V]``: the logits at each example's last real position (what comes next)."""
        batch = torch.arange(self.logits.shape[0], device=self.logits.device)
        return self.logits[batch, self.layout.last_position]


class Generation(NamedTuple):
    """Greedy generation, unpacking as ``ids, probabilities, distributions``.

    ``ids`` ``[B, N]``: the generated ids, ``[EOS]`` included, ``[PAD]`` after it;
    ``probabilities`` ``[B, N]``: each step's probability of the token it chose (0 after
    ``[EOS]``); ``distributions`` ``[B, N, V]``: each step's next-token distribution (0 after).
    """

    ids: Tensor
    probabilities: Tensor
    distributions: Tensor

    @property
    def lengths(self) -> Tensor:
        """``[B]``: the number of generated tokens of each example, ``[EOS]`` included."""
        return (self.ids != PAD_ID).sum(dim=1)


class GenerativeModel(nn.Module):
    """Image patches -> MLP projector -> causal transformer decoder over image, prompt and answer -> next token."""

    def __init__(self, config: GenerativeConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.text_embedding = TextEmbedding(config.vocab_size, config.max_text_length, hidden)
        self.patch_embedding = PatchEmbedding(config.image_size, config.patch_size, hidden)
        inputs = 3 * config.patch_size**2 if config.projector_on_pixels else hidden
        self.projector = nn.Sequential(
            nn.Linear(inputs, config.projector_hidden_size), nn.GELU(), nn.Linear(config.projector_hidden_size, hidden)
        )
        self.layers = nn.ModuleList(
            SelfAttentionBlock(hidden, config.num_heads, config.intermediate_size) for _ in range(config.num_layers)
        )
        self.final_norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, config.vocab_size)
        self.apply(init_weights)
        if config.image_positions_in_decoder:
            grid = config.image_size // config.patch_size
            self.image_positions = nn.Embedding(config.num_patches, hidden)
            with torch.no_grad():
                self.image_positions.weight.copy_(grid_position_table(grid, hidden))

    def forward(
        self,
        pixels: Tensor,
        input_ids: Tensor,
        input_mask: Tensor,
        image_keep: Tensor | None = None,
        text_keep: Tensor | None = None,
    ) -> GenerativeOutput:
        """Next-token logits over ``[BOS] image prompt [SEP] answer-so-far``, minus deleted tokens.

        ``pixels`` ``[B, 3, H, W]`` in [-1, 1]; ``input_ids`` ``[B, T]`` right-padded generative ids,
        the prompt (``encode_prompt``) and any answer tokens so far (teacher forcing);
        ``input_mask`` ``[B, T]`` True for real ids. ``image_keep`` / ``text_keep`` list the
        patches / indices into ``input_ids`` to keep (``[K]`` for the batch or ``[B, K]``, in
        increasing order); ``[BOS]`` (index 0) and each example's last real token must be kept.
        """
        layout = self.layout(pixels, input_ids, input_mask, image_keep, text_keep)
        text_ids = input_ids.gather(1, layout.text_positions)
        text = self.text_embedding(text_ids, layout.text_positions)
        image = self.embed_image(pixels, layout.image_positions)
        x = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
        length = x.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None] & layout.sequence_mask[:, None, :]
        hidden_states, attentions = [x], []
        for layer in self.layers:
            x, probs = layer(x, attention_mask=allowed)
            hidden_states.append(x)
            attentions.append(probs)
        logits = self.lm_head(self.final_norm(x))
        return GenerativeOutput(logits, attentions, hidden_states, layout)

    def embed_image(self, pixels: Tensor, image_positions: Tensor) -> Tensor:
        """Image tokens ``[B, Ki, D]`` of the patches ``image_positions`` ``[B, Ki]``: patch embedding, projector."""
        if self.config.projector_on_pixels:
            tokens = self.projector(gather_tokens(self.patch_embedding.patchify(pixels), image_positions))
        else:
            tokens = self.projector(self.patch_embedding(pixels, image_positions))
        if self.config.image_positions_in_decoder:
            tokens = tokens + self.image_positions(image_positions)
        return tokens

    def layout(
        self,
        pixels: Tensor,
        input_ids: Tensor,
        input_mask: Tensor,
        image_keep: Tensor | None = None,
        text_keep: Tensor | None = None,
    ) -> SequenceLayout:
        """Validate the inputs and lay out the kept tokens (see ``SequenceLayout``)."""
        batch, length = input_ids.shape
        config = self.config
        if length > config.max_text_length:
            raise ValueError(f"input_ids has {length} tokens; the model takes at most {config.max_text_length}")
        expected = (batch, 3, config.image_size, config.image_size)
        if tuple(pixels.shape) != expected:
            raise ValueError(f"pixels must be {expected}, got {tuple(pixels.shape)}")
        device = input_ids.device
        input_mask = input_mask.bool()
        text_positions = keep_index(text_keep, batch, length, device)
        if text_positions.shape[1] == 0 or bool((text_positions[:, 0] != 0).any()):
            raise ValueError("text_keep must start with 0: [BOS] is always kept")
        last_text = input_mask.sum(dim=1) - 1
        if not bool((text_positions == last_text[:, None]).any(dim=1).all()):
            raise ValueError("text_keep must keep each example's last real token: it predicts the next one")
        image_positions = keep_index(image_keep, batch, config.num_patches, device)
        text_mask = input_mask.gather(1, text_positions)
        special = torch.isin(input_ids.gather(1, text_positions), _SPECIAL_IDS.to(device))
        text_modality = torch.where(special, SPECIAL, TEXT)
        text_modality = torch.where(text_mask, text_modality, PAD)
        image_modality = torch.full_like(image_positions, IMAGE)
        modality = torch.cat([text_modality[:, :1], image_modality, text_modality[:, 1:]], dim=1)
        source_index = torch.cat([text_positions[:, :1], image_positions, text_positions[:, 1:]], dim=1)
        sequence_mask = modality != PAD
        kept_last = (text_positions == last_text[:, None]).long().argmax(dim=1)
        last_position = torch.where(kept_last == 0, 0, kept_last + image_positions.shape[1])
        return SequenceLayout(modality, source_index, text_positions, image_positions, sequence_mask, last_position)

    @torch.no_grad()
    def generate(
        self,
        pixels: Tensor,
        prompt_ids: Sequence[Sequence[int]] | Tensor,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> Generation:
        """Greedy answers to prompts, stopping at ``[EOS]``; one full forward pass per step.

        ``prompt_ids``: one id list per image (``encode_prompt``), or a ``[B, T]`` tensor
        right-padded with ``[PAD]``. Prompts of different lengths are right-padded and each
        step appends every unfinished example's token right after its own last token, so a
        batch gives each example what it would get alone (up to float rounding).
        """
        if isinstance(prompt_ids, Tensor):
            prompt_ids = [[int(i) for i in row if int(i) != PAD_ID] for row in prompt_ids]
        sequences = [list(prompt) for prompt in prompt_ids]
        batch = len(sequences)
        if batch != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images for {batch} prompts")
        room = self.config.max_text_length - max(len(s) for s in sequences) + 1
        steps = max(0, min(max_new_tokens, room))
        ids = torch.full((batch, steps), PAD_ID, dtype=torch.long)
        probabilities = torch.zeros(batch, steps)
        distributions = torch.zeros(batch, steps, self.config.vocab_size)
        running = list(range(batch))
        for step in range(steps):
            input_ids, input_mask = pad_ids([sequences[row] for row in running])
            output = self(pixels[running], input_ids, input_mask)
            distribution = output.next_token_logits().softmax(dim=-1)
            chosen = distribution.argmax(dim=-1)
            for index, row in enumerate(running):
                token = int(chosen[index])
                ids[row, step] = token
                probabilities[row, step] = distribution[index, token]
                distributions[row, step] = distribution[index]
                sequences[row].append(token)
            running = [row for row in running if sequences[row][-1] != EOS_ID]
            if not running:
                return Generation(ids[:, : step + 1], probabilities[:, : step + 1], distributions[:, : step + 1])
        return Generation(ids, probabilities, distributions)


def pad_ids(sequences: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Right-padded ``[B, T]`` ids (``[PAD]``) and their validity mask, for id lists of any lengths."""
    length = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.as_tensor(list(sequence), dtype=torch.long)
        mask[row, : len(sequence)] = True
    return ids, mask


def images_to_pixels(images: Sequence[np.ndarray]) -> Tensor:
    """``[H, W, 3]`` uint8 images to ``[B, 3, H, W]`` float pixels in [-1, 1]."""
    return pixels_from_uint8(torch.from_numpy(np.stack(images)))


def teacher_forced_batch(
    images: Sequence[np.ndarray], prompts: Sequence[str], answers: Sequence[str]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pixels, ids and mask of ``prompt + answer`` (without the final ``[EOS]``) and the targets.

    ``targets`` ``[B, T]`` holds, at each text index, the id the model should predict next
    there (the answer's words and ``[EOS]``, from ``[SEP]`` on), and -100 (ignored) elsewhere.
    """
    encoded_prompts = [encode_prompt(prompt) for prompt in prompts]
    encoded_answers = [encode_answer(answer) for answer in answers]
    input_ids, input_mask = pad_ids([p + a[:-1] for p, a in zip(encoded_prompts, encoded_answers, strict=True)])
    targets = torch.full(input_ids.shape, -100, dtype=torch.long)
    for row, (prompt, answer) in enumerate(zip(encoded_prompts, encoded_answers, strict=True)):
        targets[row, len(prompt) - 1 : len(prompt) - 1 + len(answer)] = torch.tensor(answer)
    return images_to_pixels(images), input_ids, input_mask, targets


def answer_loss(
    model: GenerativeModel, images: Sequence[np.ndarray], prompts: Sequence[str], answers: Sequence[str]
) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher-forced cross-entropy of each answer token and ``[EOS]`` (``[B, T]``), whether each was
    predicted right, and which tokens are scored (both ``[B, T]`` bool).

    Only the answer is scored (as in LLaVA's instruction tuning): the image and prompt are given,
    never predicted.
    """
    pixels, input_ids, input_mask, targets = teacher_forced_batch(images, prompts, answers)
    output = model(pixels, input_ids, input_mask)
    image_tokens = output.layout.num_image_tokens
    text_logits = torch.cat([output.logits[:, :1], output.logits[:, 1 + image_tokens :]], dim=1)
    token_loss = nn.functional.cross_entropy(text_logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    scored = targets != -100
    return token_loss, (text_logits.argmax(dim=-1) == targets) & scored, scored


@torch.no_grad()
def evaluate(
    model: GenerativeModel, num_questions: int = 2000, num_descriptions: int = 1000, batch_size: int = 250
) -> dict[str, float]:
    """Held-out scores of greedy generation on seeds from ``world.HELDOUT_SEED_START`` on.

    ``answer_exact_match`` overall and ``answer_exact_match_<kind>`` per question kind, on the
    first ``num_questions`` seeds' questions; ``description_correct`` on the first
    ``num_descriptions`` seeds' scenes (``world.description_correct``).
    """
    model.eval()
    scores: dict[str, float] = {}
    for task, count in (("question", num_questions), ("describe", num_descriptions)):
        hits: list[bool] = []
        kinds: list[str] = []
        for offset in range(0, count, batch_size):
            seeds = range(world.HELDOUT_SEED_START + offset, world.HELDOUT_SEED_START + min(count, offset + batch_size))
            drawn = [world.generative_example_for_seed(seed, task) for seed in seeds]
            pixels = images_to_pixels([scene.image for scene, _ in drawn])
            generation = model.generate(pixels, [encode_prompt(example.prompt) for _, example in drawn])
            for (scene, example), ids in zip(drawn, generation.ids.tolist(), strict=True):
                text = decode(ids)
                if task == "question":
                    hits.append(world.answer_correct(example.reference, text))
                    kinds.append(world.question_kind(example.prompt))
                else:
                    hits.append(world.description_correct(scene, text))
        if task == "question":
            scores["answer_exact_match"] = float(np.mean(hits))
            for kind in world.QUESTION_KINDS:
                of_kind = [hit for hit, other in zip(hits, kinds, strict=True) if other == kind]
                if of_kind:
                    scores[f"answer_exact_match_{kind}"] = float(np.mean(of_kind))
        else:
            scores["description_correct"] = float(np.mean(hits))
    return scores
