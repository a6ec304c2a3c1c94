"""Generated-answer extraction at LLaVA-1.5 scale: bytes per example, peak memory, time per token.

The model is ``LlavaForConditionalGeneration`` shaped like llava-1.5-7b where it matters for
the cost of a generated token: 576 image tokens (a 336-pixel CLIP grid of 14-pixel patches),
a Llama decoder 4096 wide with 32 heads (32 key/value heads) and an 11008-wide MLP, a
32064-token vocabulary; random weights, a few decoder layers (``--layers``) and a one-layer,
64-wide vision tower (its cost is paid once per example and is not what is measured). Each
measurement runs in its own process (clean peak memory), with all layers' costs then scaled
to 32 layers from the per-layer difference of two depths (``--layers`` and one less).

Measured per example (``--new-tokens`` greedy tokens, no early stop):

* ``bare``: the model's own ``generate`` (SDPA, KV cache): the reference;
* ``default``: ``capture_answer`` with the default options (answer rows of every layer and
  head, their hidden states, top-5 alternatives, raw attention and rollout recorded while
  generating), then the record written to a store: the target is <= 1.5x ``bare``;
* ``full``: every layer's full maps (``rows="all"``) and all four relevancy methods (the
  gradient ones run one backward pass per generated token), over ``--full-tokens`` tokens.

    python benchmarks/bench_generation.py [--layers 2] [--new-tokens 32] [--full-tokens 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL_LAYERS = 32
PROMPT = "describe the image in detail and say what color the square in the top left corner is and why it is there"


def _build(layers: int) -> tuple[object, object]:
    """The LLaVA-1.5-shaped model (random weights, ``layers`` decoder layers) and its processor."""
    import torch
    import transformers

    from tests.hf_tiny import llava_processor

    torch.manual_seed(0)
    processor = llava_processor(Path(tempfile.mkdtemp()), image_size=336, patch_size=14)
    tokenizer = processor.tokenizer
    vision = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=336, patch_size=14
    )
    text = transformers.LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
    )
    config = transformers.LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
        vision_feature_layer=-1,
    )
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None
    return model, processor


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(mode: str, layers: int, new_tokens: int) -> dict[str, float]:
    """One measurement in this process."""
    import numpy as np
    import torch

    from tests.hf_tiny import scene
    from vlinterpret_panel.adapters.base import ModelInput
    from vlinterpret_panel.adapters.generative import GenerationOptions, capture_answer
    from vlinterpret_panel.adapters.hf_llava import LlavaAdapter
    from vlinterpret_panel.relevancy.answer import ANSWER_METHODS
    from vlinterpret_panel.schema import records_to_dataset
    from vlinterpret_panel.store import write_shard

    torch.set_num_threads(os.cpu_count() or 1)
    model, processor = _build(layers)
    adapter = LlavaAdapter(model, processor, name="llava-1.5-shaped")
    image = scene(336, 336, 0)
    baseline = _peak_mb()
    result: dict[str, float] = {"layers": layers, "tokens": new_tokens}
    began = time.perf_counter()
    if mode == "bare":
        from vlinterpret_panel.adapters.sdpa_recording import attention_implementation

        encoded = adapter._encode(image, PROMPT)
        result["prompt_tokens"] = int(encoded["input_ids"].shape[1])
        with attention_implementation(model, "sdpa"), torch.no_grad():
            output = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False)
        assert output.shape[1] - encoded["input_ids"].shape[1] == new_tokens
    else:
        options = (
            GenerationOptions(max_new_tokens=new_tokens)
            if mode == "default"
            else GenerationOptions(max_new_tokens=new_tokens, rows="all", methods=ANSWER_METHODS)
        )
        record, info = capture_answer(adapter, ModelInput("example", image, PROMPT), options)
        assert len(record.answer.tokens) == new_tokens
        store = Path(tempfile.mkdtemp()) / "store"
        shard = write_shard(records_to_dataset([record], info), store)
        result["bytes"] = shard.stat().st_size
        result["answer_attention_bytes_float32"] = float(np.asarray(record.answer.attention).nbytes)
    result["seconds"] = time.perf_counter() - began
    result["peak_extra_mb"] = _peak_mb() - baseline
    return result


def _measure(mode: str, layers: int, new_tokens: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--run", mode, "--layers", str(layers), "--new-tokens", str(new_tokens)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode:
        raise SystemExit(f"{mode} with {layers} layers failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _scaled(small: dict[str, float], large: dict[str, float], key: str) -> float:
    """``key`` at ``MODEL_LAYERS`` layers, linear in the layer count through the two measurements."""
    per_layer = (large[key] - small[key]) / (large["layers"] - small["layers"])
    return large[key] + per_layer * (MODEL_LAYERS - large["layers"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the larger measured model")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--full-tokens", type=int, default=4, help="tokens of the full-storage run (slow)")
    parser.add_argument("--run", choices=["bare", "default", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(_run(args.run, args.layers, args.new_tokens)))
        return
    depths = (args.layers - 1, args.layers)
    runs = {
        (mode, depth): _measure(mode, depth, args.full_tokens if mode == "full" else args.new_tokens)
        for mode in ("bare", "default", "full")
        for depth in depths
    }
    bare_small, bare = runs[("bare", depths[0])], runs[("bare", depths[1])]
    print(f"LLaVA-1.5-shaped decoder: {bare['prompt_tokens']:.0f} prompt tokens (576 image), hidden 4096, 32 heads")
    print(f"{'':34s}{'measured':>28s}{'scaled to 32 layers':>24s}")
    bare_token = bare["seconds"] / bare["tokens"]
    bare_token_32 = _scaled(bare_small, bare, "seconds") / bare["tokens"]
    print(f"{'bare generate, s/token':34s}{bare_token:>20.3f} ({args.layers} layers){bare_token_32:>24.3f}")
    for mode in ("default", "full"):
        small, large = runs[(mode, depths[0])], runs[(mode, depths[1])]
        token = large["seconds"] / large["tokens"]
        token_32 = _scaled(small, large, "seconds") / large["tokens"]
        bytes_32 = _scaled(small, large, "bytes")
        memory_32 = _scaled(small, large, "peak_extra_mb")
        print(f"{mode + ' extraction, s/token':34s}{token:>20.3f}{'':11s}{token_32:>24.3f}")
        print(
            f"{mode + ' / bare, per token':34s}{token / bare_token:>20.2f}x{'':10s}{token_32 / bare_token_32:>23.2f}x"
        )
        label = f"{mode} bytes/example ({large['tokens']:.0f} tok)"
        print(f"{label:34s}{large['bytes'] / 2**20:>17.1f} MB{'':11s}{bytes_32 / 2**20:>21.1f} MB")
        print(f"{mode + ' peak memory over model':34s}{large['peak_extra_mb']:>17.0f} MB{'':11s}{memory_32:>21.0f} MB")
    print(f"(bare peak memory over the model: {bare['peak_extra_mb']:.0f} MB at {args.layers} layers)")
    length = bare["prompt_tokens"] + args.new_tokens
    full_maps = MODEL_LAYERS * 32 * length**2 * 2
    print(
        f"(full maps of a {args.new_tokens}-token answer, 32 layers x 32 heads x {length:.0f}^2 x 16 bits: "
        f"{full_maps / 2**20:.0f} MB per example before compression)"
    )


if __name__ == "__main__":
    main()
