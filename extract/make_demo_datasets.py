"""Make the shipped demo datasets: the built-in models on held-out scenes, with relevancy.

    python extract/make_demo_datasets.py [--only single_stream,dual_stream,dual_encoder,generative]

Each store (``datasets/<model>``) is replaced, not appended to, so rerunning after the
models' weights change gives stores of the new weights only. The scenes are the held-out
seeds ``world.HELDOUT_SEED_START + i`` (the seeds ``registry.evaluate_vqa`` scores), the same
scenes for every model: questions with answers for the VQA models, captions for the dual
encoder, and for the generative model alternately the description prompt and the question,
its answer generated and stored token by token (``--generate``); each example has its
ground-truth ``target_mask`` (generated answers: one per generated token). Extraction goes through
``vlinterpret_panel.extract.extract``, as ``vlinterpret extract MODEL STORE --scenes N --seed
1000000000 --relevancy ...`` does. ``datasets/README.md`` is rewritten with the figures of this
run (accuracy, weights, sizes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlinterpret_panel.adapters.generative import GenerationOptions
from vlinterpret_panel.extract import ExampleSource, extract, scene_sources
from vlinterpret_panel.models import world
from vlinterpret_panel.relevancy.answer import ANSWER_METHODS
from vlinterpret_panel.store import open_dataset

DATASETS = Path(__file__).resolve().parents[1] / "datasets"
RELEVANCY = ("generic", "rollout", "raw_attention", "attention_gradcam", "attnlrp")
TARGETS = ("predicted", "runner-up", "predicted vs runner-up")
"""What the VQA stores' gradient methods explain: the prediction, the runner-up, and why the one rather than the
other (the relevancy view's pair row shows all three without a model)."""
FIRST_SEED = world.HELDOUT_SEED_START
COMMAND = "python extract/make_demo_datasets.py"


@dataclass(frozen=True)
class DemoSpec:
    """One demo store: which built-in model, how many scenes, and their text."""

    model: str
    examples: int
    scene_text: str


SPECS = (
    DemoSpec("single_stream", 200, "question"),
    DemoSpec("dual_stream", 100, "question"),
    DemoSpec("dual_encoder", 100, "caption"),
    DemoSpec("generative", 120, "describe+question"),
)
EXAMPLE_KINDS = {
    "question": "questions",
    "caption": "captions",
    "describe+question": "descriptions and questions",
}
GENERATION = GenerationOptions(methods=list(ANSWER_METHODS), rows="all")
"""The generative store: answers up to 32 tokens, every layer and head, all four methods, and the full
maps (``--rows all``: at this model's size they are small) so every view of the dashboard works on it."""
GENERATIVE_TARGETS = ("predicted", "predicted vs runner-up")
"""What the generative store's gradient methods explain at each generated token: the token, and why it rather
than the next most probable one (the evaluation's best map on this model)."""


def demo_sources(spec: DemoSpec) -> list[ExampleSource]:
    """The held-out scenes of a demo store; the generative one alternates descriptions and questions."""
    if spec.scene_text != "describe+question":
        return scene_sources(spec.examples, seed=FIRST_SEED, text=spec.scene_text)
    return [
        ExampleSource(f"scene-{seed:07d}", seed=seed, scene_text="describe" if index % 2 == 0 else "question")
        for index, seed in enumerate(range(FIRST_SEED, FIRST_SEED + spec.examples))
    ]


def make_store(spec: DemoSpec) -> dict[str, object]:
    """Replace ``datasets/<model>`` with a fresh extraction; return its figures (``store_figures``)."""
    store = DATASETS / spec.model
    if store.exists():
        shutil.rmtree(store)
    generative = spec.scene_text == "describe+question"
    report = extract(
        spec.model,
        demo_sources(spec),
        store,
        batch_size=16,
        examples_per_shard=60 if generative else 50,
        precision="float16",
        relevancy=() if generative else RELEVANCY,
        targets={"question": TARGETS, "describe+question": GENERATIVE_TARGETS}.get(spec.scene_text, ()),
        generation=GENERATION if generative else None,
        progress=False,
    )
    if report.failures or report.written != spec.examples:
        raise SystemExit(f"{spec.model}: {len(report.failures)} example(s) failed: {report.failures[:3]}")
    return store_figures(spec)


def store_figures(spec: DemoSpec) -> dict[str, object]:
    """What the README reports about ``datasets/<model>``: size, outcome and the weights used."""
    store = DATASETS / spec.model
    ds = open_dataset(store)
    config = json.loads(ds.attrs["model_config"])
    figures: dict[str, object] = {
        "examples": int(ds.sizes["example"]),
        "tokens": int(ds.sizes["token"]),
        "layers": int(ds.sizes["layer"]),
        "methods": ds.relevancy_method.values.tolist(),
        "megabytes": sum(p.stat().st_size for p in store.glob("*.nc")) / 1e6,
        "weights_sha256": config["weights_sha256"],
        "weights_metrics": config["weights_metrics"],
    }
    if spec.scene_text == "describe+question":
        described = np.array([str(text) == world.DESCRIBE_PROMPT for text in ds.text.values])
        hits = []
        for example, prediction, label, describe in zip(
            ds.example.values, ds.prediction.values, ds.label.values, described, strict=True
        ):
            scene = world.scene_for_seed(int(str(example).removeprefix("scene-")))
            hits.append(
                world.description_correct(scene, str(prediction))
                if describe
                else world.answer_correct(str(label), str(prediction))
            )
        figures["descriptions_correct"] = float(np.mean(np.array(hits)[described]))
        figures["answers_correct"] = float(np.mean(np.array(hits)[~described]))
        figures["mean_answer_tokens"] = float((ds.answer_position >= 0).sum("step").mean())
    elif spec.scene_text == "question":
        correct = ds.correct.values == 1
        figures["accuracy"] = float(np.mean(correct))
        kinds = np.array([" ".join(str(text).split()[:2]) for text in ds.text.values])
        figures["accuracy_by_question"] = {
            f"{kind} ...": f"{np.mean(correct[kinds == kind]):.0%} of {int(np.sum(kinds == kind))}"
            for kind in sorted(set(kinds))
        }
    else:
        figures["mean_score"] = float(ds.score.mean())
    return figures


def _model_line(spec: DemoSpec, figures: dict[str, object]) -> str:
    metrics = figures["weights_metrics"]
    if spec.scene_text == "describe+question":
        outcome = (
            f"descriptions fully correct {figures['descriptions_correct']:.1%}, answers exact "
            f"{figures['answers_correct']:.1%} on these scenes (weights' held-out results at training: "
            f"{metrics.get('heldout_description_correct', float('nan')):.2%} and "
            f"{metrics.get('heldout_answer_exact_match', float('nan')):.2%}); "
            f"{figures['mean_answer_tokens']:.1f} generated tokens per answer on average"
        )
    elif spec.scene_text == "question":
        outcome = (
            f"answer accuracy {figures['accuracy']:.1%} on these {figures['examples']} scenes "
            f"(weights' held-out accuracy at training: {metrics.get('heldout_accuracy', float('nan')):.2%} "
            f"on {metrics.get('heldout_examples')} scenes); by question: "
            + ", ".join(f"{kind} {share}" for kind, share in dict(figures["accuracy_by_question"]).items())
        )
    else:
        outcome = (
            f"mean image-caption similarity {figures['mean_score']:.1f} (temperature-scaled cosine); "
            f"weights' held-out top-1 retrieval among 8 captions at training: "
            f"{metrics.get('heldout_top1_retrieval_of_8', float('nan')):.2%}"
        )
    return (
        f"| `{spec.model}` | {figures['examples']} {EXAMPLE_KINDS[spec.scene_text]} | {figures['layers']} | "
        f"{figures['megabytes']:.1f} MB | {outcome}; weights sha256 `{str(figures['weights_sha256'])[:12]}` |"
    )


def write_readme(results: dict[str, dict[str, object]]) -> None:
    """Rewrite ``datasets/README.md`` with how the stores were made and this run's figures."""
    rows = "\n".join(_model_line(spec, results[spec.model]) for spec in SPECS if spec.model in results)
    text = f"""# Demo datasets

Stores of the [schema](../docs/schema.md), opened with `vlinterpret_panel.open_dataset(PATH)`
or served with `vlinterpret serve PATH`.

| store | examples | attention layers | size | model outcome |
|---|---|---|---|---|
{rows}

`synthetic/` is a small synthetic store (random values, `vlinterpret synth`) used by the docs.

## How they were made

```bash
{COMMAND}
```

This one command (re)writes `single_stream/`, `dual_stream/`, `dual_encoder/` and `generative/` (each
store is deleted first, so a rerun replaces it) and this file. It runs each built-in model
(`vlinterpret_panel/models/weights/`, loaded through `load_adapter(NAME)`) with
`vlinterpret_panel.extract.extract`, the function behind
`vlinterpret extract NAME STORE --scenes N --seed {FIRST_SEED} --relevancy {",".join(RELEVANCY)}`
{" ".join(f'--target "{target}"' for target in TARGETS)} (`--scene-text caption` and no target for the dual
encoder: its score has no runner-up), batch size 16, 50 examples per shard, float16 storage.
The generative store is the function behind `vlinterpret extract generative STORE --scenes N
--scene-text describe --generate --relevancy all --rows all`
{" ".join(f'--target "{target}"' for target in GENERATIVE_TARGETS)} (and `--scene-text question` for
every other scene), 60 examples per shard: answers of up to 32 generated tokens, every layer and
head, the gradient methods for the generated token and against the runner-up at each step, and the
full maps of the whole sequence, so the attention views work on it as well as the answer view.
Shard names change on every run: commit a rerun with
`git add datasets/README.md datasets/single_stream datasets/dual_stream datasets/dual_encoder datasets/generative`,
which records the removed shards too.

* **Scenes**: the held-out seeds {FIRST_SEED} onwards (`world.HELDOUT_SEED_START`, never
  used in training; the first ones are those `registry.evaluate_vqa` scores), the same scenes
  for every model. The VQA stores hold the question, its ground-truth answer as `label`,
  `prediction`, `score` (softmax probability) and `correct`; their accuracy above equals
  `registry.evaluate_vqa(model, num_examples=N)` on the same seeds (checked when this was
  written; `tests/test_adapters_builtin.py` checks it on 50). The dual-encoder store holds
  the caption and its similarity as `score` (no label or prediction).
* **Target masks**: `target_mask` is the object the question is about (empty for "is
  there ...?" questions answered "no"); for captions, every object (a caption names them all).
* **Relevancy**: `relevancy(example, relevancy_method, token)` for {", ".join(f"`{m}`" for m in RELEVANCY)},
  explaining the prediction (VQA) or the similarity score (dual encoder), recorded in
  `relevancy_target`. Gradient methods ran one example at a time. `attnlrp` values are signed
  (negative: speaks against the answer).
* **Deterministic**: the scenes, the weights and the extraction are deterministic, so a rerun
  with the same weights stores the same values (shard file names and creation times differ).
  The weights' sha256 above and in each store's `model_config` attribute (with their
  training metrics) say which weights a store was made with.
"""
    (DATASETS / "README.md").write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated subset of the models (default: all)")
    args = parser.parse_args()
    wanted = args.only.split(",") if args.only else [spec.model for spec in SPECS]
    results = {}
    for spec in SPECS:
        if spec.model in wanted:
            results[spec.model] = make_store(spec)
            print(f"datasets/{spec.model}: {json.dumps(results[spec.model], default=str)}", flush=True)
    for spec in SPECS:  # the stores not remade this run are described as they are
        if spec.model not in results and (DATASETS / spec.model).exists():
            results[spec.model] = store_figures(spec)
    write_readme(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
