"""Cost of relevancy (generic method, with gradient capture) next to a forward pass, built-in single-stream model.

One held-out VQA example. Timed alternately, each the median over ``--runs`` runs after a warm-up:

- forward: the adapter's forward pass without gradients (preprocessing, model, attention capture);
- relevancy: ``adapter.run(item, gradients=True)`` (forward with grad, backward to every attention
  map, the schema record) plus ``Captured.from_record`` and ``generic_relevancy``.

The target is relevancy <= 3x forward. The same pair is also timed on the model directly, without
the adapter: the bare forward without grad, and forward with grad + ``torch.autograd.grad`` to the
model's own ``[1, heads, T, T]`` maps (with one example they are graph nodes already) + ``Captured``
+ ``generic_relevancy``: the cost of the method itself, apart from the adapter's capture machinery.

    python benchmarks/bench_relevancy.py [--runs 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from vlinterpret_panel.adapters.base import ModelInput
from vlinterpret_panel.adapters.registry import load_adapter
from vlinterpret_panel.models import world
from vlinterpret_panel.models.registry import images_to_pixels, texts_to_ids
from vlinterpret_panel.relevancy import Captured, generic_relevancy


def interleaved_medians(first: Callable[[], object], second: Callable[[], object], runs: int) -> tuple[float, float]:
    """Median wall times of two actions timed alternately (so both see the same machine load), after a warm-up."""
    for _ in range(5):
        first()
        second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for action, bucket in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            action()
            bucket.append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    """Print the forward time, the relevancy time and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapter = load_adapter("single_stream")
    scene, question = world.vqa_example_for_seed(world.HELDOUT_SEED_START)
    item = ModelInput("bench", scene.image, question.question, question.answer, question.target_mask)

    def forward() -> object:
        with torch.no_grad():
            return adapter.forward(item.image, item.text)

    def relevancy() -> object:
        record, info = adapter.run(item, gradients=True)
        return generic_relevancy(Captured.from_record(record, info))

    model = adapter.model
    text_ids, text_mask = texts_to_ids([item.text])
    pixels = images_to_pixels([item.image])
    modality = ["special" if t in world.SPECIAL_TOKENS else "text" for t in world.tokenize(item.text)]
    modality = ["special", *modality, "special"] + ["image"] * model.config.num_patches

    def model_forward() -> object:
        with torch.no_grad():
            return model(text_ids, text_mask, pixels)

    def model_relevancy() -> object:
        output = model(text_ids, text_mask, pixels)
        maps = [attention.probs for attention in output.attentions]
        gradients = torch.autograd.grad(output.logits[0].max(), maps)
        captured = Captured(
            attention=torch.cat(maps).detach().numpy(),
            attention_gradient=torch.cat(gradients).numpy(),
            layer_kind=["self"] * len(maps),
            modality=modality,
            readout_tokens={"answer": 0},
        )
        return generic_relevancy(captured)

    print(f"built-in single_stream, 1 example, torch threads {args.threads}, median of {args.runs} runs")
    rows = (
        ("through the adapter", "forward (no grad, capture)", forward, "run(gradients=True) + generic", relevancy),
        (
            "on the model directly",
            "forward (no grad)",
            model_forward,
            "grad forward + backward + generic",
            model_relevancy,
        ),
    )
    for title, forward_name, forward_action, relevancy_name, relevancy_action in rows:
        forward_seconds, relevancy_seconds = interleaved_medians(forward_action, relevancy_action, args.runs)
        ratio = relevancy_seconds / forward_seconds
        print(f"  {title}:")
        print(f"    {forward_name:<36} {1000 * forward_seconds:7.2f} ms")
        print(f"    {relevancy_name:<36} {1000 * relevancy_seconds:7.2f} ms")
        print(f"    ratio {ratio:.2f}x (target <= 3x): {'met' if ratio <= 3 else 'NOT met'}")


if __name__ == "__main__":
    main()
