"""GGUF files through transformers: dequantised float weights, the tokenizer from the same file.

Dequantising takes seconds to minutes, so the dequantised model is kept once per file (path,
size, mtime) as a plain safetensors folder under ``$MODELSURGERY_CACHE`` (default
``$MODELSURGERY_HOME/cache/models``, beside the store, so a scratch home keeps it too); later
loads read that folder instead (about 20x faster).

The config is read from the GGUF metadata alone (transformers' gguf config reader, no tensors
dequantised) and cached per file (path, size, mtime), because a server validates many specs
against the same base model.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import shutil
import uuid
from pathlib import Path

import torch
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from modelsurgery.models.aliases import models_cache_dir

try:  # transformers >= 5 keeps GGUF weights packed unless asked to dequantise
    from transformers import GgufConfig
except ImportError:  # pragma: no cover - older transformers always dequantises
    GgufConfig = None


def load_gguf_config(path: Path) -> PretrainedConfig:
    """The model config from the file's metadata (a few seconds once, then cached)."""
    stat = path.stat()
    return copy.deepcopy(_cached_config(str(path), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _cached_config(path: str, _size: int, _mtime_ns: int) -> PretrainedConfig:
    file = Path(path)
    return AutoConfig.from_pretrained(file.parent, gguf_file=file.name, trust_remote_code=False)


def load_gguf_model(path: Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A plain dense model: weights dequantised (float32 unless ``dtype`` says otherwise) and
    the quantization marker removed so ``save_pretrained`` and the store accept it."""
    kwargs: dict[str, object] = {"gguf_file": path.name, "trust_remote_code": False}
    if GgufConfig is not None:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
    drop_quantization(model)
    return model


def load_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)


def drop_quantization(model: PreTrainedModel) -> None:
    """Forget a GGUF quantization the weights no longer have (they were dequantised on load)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise RuntimeError(f"GGUF weights left packed after loading: {', '.join(packed[:5])}")


CACHE_ENV = "MODELSURGERY_CACHE"


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else models_cache_dir()


def dequantized_folder(path: Path) -> Path:
    """Where the dequantised copy of this exact file lives (it may not exist yet)."""
    stat = path.stat()
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return cache_root() / "gguf" / hashlib.sha256(key.encode()).hexdigest()[:32]


def load_gguf(
    path: Path, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer of a GGUF file, through the dequantised-folder cache."""
    folder = dequantized_folder(path)
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if not folder.is_dir():
                _write_dequantized(path, folder)
    kwargs: dict[str, object] = {"trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def _write_dequantized(path: Path, folder: Path) -> None:
    """Dequantise once into a temp folder, then rename: a folder that exists is complete."""
    partial = folder.with_name(f"{folder.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        load_gguf_model(path).save_pretrained(partial)
        load_gguf_tokenizer(path).save_pretrained(partial)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
