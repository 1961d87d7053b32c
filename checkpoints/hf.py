"""What of a loaded Hugging Face model and tokenizer the store keeps besides weights.

The config is stored as ``config.to_dict()`` without keys that describe how this copy was
loaded rather than what the model is: a GGUF-loaded model carries a ``quantization_config``
that ``save_pretrained`` refuses (its weights are already dequantised), and ``_name_or_path``
and the library version would make identical weights import as different versions.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TRANSIENT_KEYS = frozenset({"quantization_config", "transformers_version"})


def json_file_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def config_dict(model: torch.nn.Module) -> dict[str, Any]:
    config = {
        key: value
        for key, value in model.config.to_dict().items()
        if key not in TRANSIENT_KEYS and not key.startswith("_")
    }
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    return config


def generation_config_dict(model: torch.nn.Module) -> dict[str, Any] | None:
    generation_config = getattr(model, "generation_config", None)
    if generation_config is None:
        return None
    config = json.loads(generation_config.to_json_string(use_diff=True))
    return {k: v for k, v in config.items() if k not in TRANSIENT_KEYS}


def model_files(model: torch.nn.Module) -> dict[str, bytes]:
    files = {CONFIG_FILE: json_file_bytes(config_dict(model))}
    generation = generation_config_dict(model)
    if generation is not None:
        files[GENERATION_CONFIG_FILE] = json_file_bytes(generation)
    return files


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files ``tokenizer.save_pretrained`` writes, by relative name."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        root = Path(tmp)
        return {
            path.relative_to(root).as_posix(): path.read_bytes()
            for path in sorted(root.rglob("*"))
            if path.is_file()
        }
