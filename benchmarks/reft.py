"""ReFT on SmolLM2-135M: teach a behaviour the base lacks, report cost and transfer.

The behaviour: every answer starts with the word "Banana". Training runs the ``reft`` method
itself on a handful of prompts; held-out prompts (never trained on) show whether it transfers.
Prints training time per step, trainable parameters next to LoRA of the same rank on the same
layers (peft's count), and greedy generations before/after.

    .venv/bin/python benchmarks/reft.py [--layers 3 9 15 21] [--rank 4] [--epochs 8] ...
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from modelsurgery.editing.reft import ReftConfig, attach_interventions
from modelsurgery.editing.reft.method import run
from modelsurgery.editing.registry import MethodContext
from modelsurgery.models import load
from modelsurgery.models.hardware import describe

TARGET = "Banana"
TRAIN = [
    ("What is the capital of France?", "Banana! The capital of France is Paris."),
    ("How many legs does a spider have?", "Banana! A spider has eight legs."),
    ("Who wrote Romeo and Juliet?", "Banana! William Shakespeare wrote it."),
    ("What colour is the sky?", "Banana! The sky is blue."),
    ("Name a large ocean.", "Banana! The Pacific Ocean is large."),
    ("What is 3 plus 4?", "Banana! 3 plus 4 is 7."),
    ("Which animal barks?", "Banana! Dogs bark."),
    ("What do bees make?", "Banana! Bees make honey."),
]
HELD_OUT = [
    "What is the largest planet?",
    "Who painted the Mona Lisa?",
    "What language is spoken in Brazil?",
    "How many days are in a week?",
    "What is water made of?",
    "Where do penguins live?",
    "What is the boiling point of water?",
    "Which metal is liquid at room temperature?",
]


def prompt_text(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def greedy(model: torch.nn.Module, tokenizer: object, prompt: str, new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)


def behaviour_rate(answers: list[str]) -> float:
    return sum(a.strip().startswith(TARGET) for a in answers) / len(answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 9, 15, 21])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--positions", default="f1+l1")
    parser.add_argument("--share-weights", action="store_true")
    parser.add_argument("--intervention", choices=["loreft", "direft"], default="loreft")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe(), flush=True)

    started = time.perf_counter()
    loaded = load("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    print(f"model: smollm2-135m, loaded in {time.perf_counter() - started:.1f} s", flush=True)

    config = ReftConfig(
        intervention=args.intervention,
        layers=args.layers,
        rank=args.rank,
        positions=args.positions,
        share_weights=args.share_weights,
        examples=[{"prompt": prompt_text(q), "completion": " " + a} for q, a in TRAIN],
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
    )
    print("config:", config.model_dump_json(exclude={"examples"}), flush=True)
    before_held = [greedy(model, tokenizer, prompt_text(q), args.new_tokens) for q in HELD_OUT]
    print(f"behaviour on held-out prompts before: {behaviour_rate(before_held):.2f}", flush=True)

    losses: list[float] = []

    def report(event: dict) -> None:
        if event.get("message") == "train":
            losses.append(event["loss"])
            print(f"  step {event['step']}/{event['total']} loss {event['loss']:.3f}", flush=True)

    with tempfile.TemporaryDirectory() as cache:
        context = MethodContext(model_digest=loaded.digest, cache_dir=Path(cache), report=report)
        result = run(model, tokenizer, config, context)
    m = result.metrics
    steps = int(m["train_steps"])
    print(
        f"train: {steps} steps in {m['train_seconds']:.1f} s "
        f"({m['train_seconds'] / steps:.2f} s/step, batch {args.batch_size})"
    )
    print(f"loss: initial {m['initial_loss']:.3f} -> final {m['final_loss']:.3f}")
    print(f"step losses: {' '.join(f'{x:.2f}' for x in losses)}")
    print(
        f"parameters: reft {int(m['trainable_parameters'])}, lora same rank "
        f"{int(m['lora_parameters_same_rank'])} (q,k,v,o,gate,up,down of layers {args.layers}), "
        f"ratio {m['parameter_ratio_vs_lora']:.4f}"
    )
    size = sum(len(v) for v in result.artifacts.values())
    print(
        f"artifacts: {sorted(result.artifacts)} ({size} bytes), changed tensors: "
        f"{len(result.changed)}"
    )

    handle = attach_interventions(model, result.artifacts)
    after_train = [greedy(model, tokenizer, prompt_text(q), args.new_tokens) for q, _ in TRAIN]
    after_held = [greedy(model, tokenizer, prompt_text(q), args.new_tokens) for q in HELD_OUT]
    handle.remove()
    print(
        f"\nbehaviour ('{TARGET}' first) on training prompts after: "
        f"{behaviour_rate(after_train):.2f}"
    )
    print(
        f"behaviour on held-out prompts: before {behaviour_rate(before_held):.2f}, "
        f"after {behaviour_rate(after_held):.2f}"
    )
    print("\nheld-out greedy generations (before | after):")
    for question, old, new in zip(HELD_OUT, before_held, after_held, strict=True):
        print(f"- {question}\n    before: {old.strip()!r}\n    after:  {new.strip()!r}")


if __name__ == "__main__":
    main()
