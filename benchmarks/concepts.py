"""Concept subnetworks (SparseCBM) on CEBaB with SmolLM2-135M: sparse vs dense joint concept
bottleneck, then inference-time intervention on the evaluation rows' wrongly predicted
concepts with the true values (oracle) and with random wrong values (a control).

Training runs the ``concept_bottleneck`` method itself (``compare_dense: true``); the figures
are on CEBaB dev.json rows, never trained or tuned on. ``--tune`` instead holds out 20% of
train_exclusive.json and reports on that (for choosing defaults; dev is not read).

    .venv/bin/python benchmarks/concepts.py [--train-limit N] [--eval-limit N] [--epochs 3]
        [--label-input logits|probabilities]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from modelsurgery.editing.concepts.artifacts import from_artifacts
from modelsurgery.editing.concepts.bottleneck import layer_inputs
from modelsurgery.editing.concepts.config import (
    CEBAB_CONCEPTS,
    CEBAB_TRAIN,
    CONCEPT_VALUES,
    ConceptBottleneckConfig,
)
from modelsurgery.editing.concepts.data import MISSING, ConceptData, load_concept_data
from modelsurgery.editing.concepts.intervene import intervene
from modelsurgery.editing.concepts.method import run
from modelsurgery.editing.data import shared_data_path
from modelsurgery.editing.registry import MethodContext
from modelsurgery.models import load
from modelsurgery.models.hardware import describe


def tuning_file(root: Path) -> str:
    """train_exclusive.json as an examples file (the method holds out eval_fraction of it)."""
    rows = json.loads(shared_data_path(CEBAB_TRAIN).read_text(encoding="utf-8"))
    lines = []
    for row in rows:
        if row.get("review_majority") not in ("1", "2", "3", "4", "5"):
            continue
        concepts = {
            name: row[f"{name}_aspect_majority"]
            for name in CEBAB_CONCEPTS
            if row.get(f"{name}_aspect_majority") in CONCEPT_VALUES
        }
        lines.append(
            {"text": row["description"], "label": row["review_majority"], "concepts": concepts}
        )
    (root / "tune.jsonl").write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    return "tune.jsonl"


def true_concept_ceiling(data: ConceptData, concepts: int, seed: int) -> dict[str, float]:
    """Task accuracy on the evaluation rows when the label is read from the *true* concept
    values: a linear head on their one-hot codes (the label head fed perfectly confident
    concept probabilities) trained on the training rows, and the training rows' majority
    label per combination of values. What a strict bottleneck over these concepts can reach
    with perfect concepts."""
    width = len(CONCEPT_VALUES)

    def one_hot(examples: list) -> torch.Tensor:
        x = torch.zeros(len(examples), concepts * width)
        for i, example in enumerate(examples):
            for k, value in enumerate(example.concepts):
                if value != MISSING:
                    x[i, k * width + value] = 1.0
        return x

    x, y = one_hot(data.train), torch.tensor([e.label for e in data.train])
    x_eval, y_eval = one_hot(data.evaluation), torch.tensor([e.label for e in data.evaluation])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(x.shape[1], len(data.labels))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(2000):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        linear = float((head(x_eval).argmax(-1) == y_eval).float().mean())
    votes: dict[tuple[int, ...], Counter] = defaultdict(Counter)
    for example in data.train:
        votes[example.concepts][example.label] += 1
    overall = Counter(e.label for e in data.train).most_common(1)[0][0]
    table = [
        (votes[e.concepts].most_common(1)[0][0] if votes[e.concepts] else overall) == e.label
        for e in data.evaluation
    ]
    return {"linear": linear, "table": sum(table) / len(table)}


def intervention_figures(
    model: torch.nn.Module,
    tokenizer: object,
    artifacts: dict,
    data: ConceptData,
    seed: int,
    limit: int | None,
) -> dict[str, float]:
    """Oracle and random-wrong corrections of every wrongly predicted (labelled) concept of
    the first ``limit`` evaluation rows (all by default)."""
    bottleneck = from_artifacts(model, artifacts)
    rng = random.Random(seed)
    counts = {"rows": 0, "corrected": 0, "oracle_flipped": 0, "random_flipped": 0}
    correct = {"before": 0, "oracle": 0, "random": 0}
    for row, example in enumerate(data.evaluation[:limit]):
        if row % 50 == 0:
            print(f"  intervention row {row}", flush=True)
        inputs = layer_inputs(
            model, tokenizer, [example.text], bottleneck.first, bottleneck.spec.max_tokens
        )
        with torch.no_grad():
            logits = bottleneck.concept_logits(inputs)
            label = int(bottleneck.label_logits(logits).argmax(-1))
        predicted = [int(c.argmax(-1)) for c in logits]
        wrong = {
            k: gold
            for k, gold in enumerate(example.concepts)
            if gold != MISSING and predicted[k] != gold
        }
        counts["rows"] += 1
        correct["before"] += label == example.label
        if not wrong:
            correct["oracle"] += label == example.label
            correct["random"] += label == example.label
            continue
        control = {
            k: rng.choice([v for v in range(len(CONCEPT_VALUES)) if v != g])
            for k, g in wrong.items()
        }
        for name, corrections in (("oracle", wrong), ("random", control)):
            outcome = intervene(bottleneck, inputs, corrections)
            after = [int(c.argmax(-1)) for c in outcome.concept_logits]
            counts[f"{name}_flipped"] += sum(after[k] == v for k, v in corrections.items())
            correct[name] += int(outcome.label_logits.argmax(-1)) == example.label
        counts["corrected"] += len(wrong)
    n, c = counts["rows"], max(1, counts["corrected"])
    return {
        "rows": float(n),
        "corrected_concepts": float(counts["corrected"]),
        "oracle_flip_rate": counts["oracle_flipped"] / c,
        "random_flip_rate": counts["random_flipped"] / c,
        "task_accuracy_before": correct["before"] / n,
        "task_accuracy_oracle": correct["oracle"] / n,
        "task_accuracy_random": correct["random"] / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--sparsity", type=float, default=None)
    parser.add_argument("--saliency", choices=["fisher", "magnitude"], default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--backbone-lr", type=float, default=None)
    parser.add_argument("--label-input", choices=["logits", "probabilities"], default=None)
    parser.add_argument("--tune", action="store_true", help="report on 20%% of train, not dev")
    parser.add_argument("--no-intervention", action="store_true")
    parser.add_argument(
        "--intervene-limit", type=int, default=None, help="intervene on the first N eval rows"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe(), flush=True)
    started = time.perf_counter()
    loaded = load("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    given = {
        "train_limit": args.train_limit,
        "eval_limit": args.eval_limit,
        "epochs": args.epochs,
        "layers": args.layers,
        "sparsity": args.sparsity,
        "saliency": args.saliency,
        "lr": args.lr,
        "backbone_lr": args.backbone_lr,
        "label_input": args.label_input,
    }
    with tempfile.TemporaryDirectory() as tmp:
        source = {"examples_file": tuning_file(Path(tmp))} if args.tune else {"dataset": "cebab"}
        fields = {k: v for k, v in given.items() if v is not None}
        config = ConceptBottleneckConfig.model_validate({**source, **fields, "compare_dense": True})
        print("config:", config.model_dump_json(exclude_none=True), flush=True)
        context = MethodContext(
            model_digest=loaded.digest,
            cache_dir=Path(tmp),
            data_roots=(Path(tmp),),
            report=lambda e: (
                print(
                    f"  {e['message']} step {e['step']}/{e['total']} loss {e['loss']:.3f}",
                    flush=True,
                )
                if e.get("step", 0) % 20 == 0
                else None
            ),
        )
        job_started = time.perf_counter()
        result = run(model, tokenizer, config, context)
        job_seconds = time.perf_counter() - job_started
        data = load_concept_data(config.resolved(model.config), context.data_roots)
    m = result.metrics
    ceiling = true_concept_ceiling(data, len(config.concepts), config.seed)
    split = "20% of train_exclusive (tuning)" if args.tune else "CEBaB dev.json"
    print(f"\njob seconds (sparse + dense CBM, caching included): {job_seconds:.0f}")
    counts = f"train examples {int(m['train_examples'])}, eval {int(m['eval_examples'])}"
    print(f"{counts} ({split})")
    print("\n| figure | sparse CBM | dense CBM |\n|---|---|---|")
    for name in ["task_accuracy", "task_macro_f1", "concept_accuracy_mean"] + [
        f"concept_accuracy_{c}" for c in config.concepts
    ]:
        print(f"| {name} | {m[name]:.3f} | {m['dense_' + name]:.3f} |")
    print(f"| mask_density | {m['mask_density']:.3f} | 1.000 |")
    print(
        f"| task_accuracy from the true concepts (ceiling: linear head, lookup table) | "
        f"{ceiling['linear']:.3f}, {ceiling['table']:.3f} | |"
    )
    for name in sorted(k for k in m if k.startswith("mask_overlap_layer")):
        print(f"| {name} (pairwise Jaccard) | {m[name]:.3f} | - |")
    if not args.no_intervention:
        t = time.perf_counter()
        figures = intervention_figures(
            model, tokenizer, result.artifacts, data, config.seed, args.intervene_limit
        )
        corrected = int(figures["corrected_concepts"])
        seconds = time.perf_counter() - t
        rows = int(figures["rows"])
        print(
            f"\nintervention ({seconds:.0f} s) on {rows} eval rows: {corrected} wrongly "
            "predicted concepts corrected"
        )
        print("\n| figure | oracle | random wrong (control) |\n|---|---|---|")
        print(
            f"| corrected concepts now at the given value | {figures['oracle_flip_rate']:.3f} | "
            f"{figures['random_flip_rate']:.3f} |"
        )
        base = figures["task_accuracy_before"]
        print(
            f"| task accuracy (before {base:.3f}) | {figures['task_accuracy_oracle']:.3f} | "
            f"{figures['task_accuracy_random']:.3f} |"
        )
    print(f"\ntotal seconds: {time.perf_counter() - started:.0f}")


if __name__ == "__main__":
    main()
