"""Write a version as a folder ``from_pretrained`` loads as it is.

Weights go to ``model.safetensors``, or to ``model-0000i-of-0000n.safetensors`` shards plus
``model.safetensors.index.json`` above ``max_shard_size`` (save_pretrained's layout). The stored
tensor map already holds tied weights once (under the name that owns them), so a tied lm_head is
re-tied by the loader from ``tie_word_embeddings`` exactly as after save_pretrained. Beside
them: the stored files and artifacts, the model card ``README.md`` (``model_card``) and the
lineage record ``modelsurgery.json``, written last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import save_file

from modelsurgery.checkpoints.hf import CONFIG_FILE, json_file_bytes
from modelsurgery.checkpoints.manifest import TensorEntry
from modelsurgery.proto.export_record import LINEAGE_FILE

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
MODEL_CARD_FILE = "README.md"
DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3
RESERVED_NAMES = frozenset(
    {CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, LINEAGE_FILE, MODEL_CARD_FILE}
)

Progress = Callable[[int, int], None]


def safe_relative_path(name: str) -> PurePosixPath:
    """A stored file name as a path that stays inside the export folder."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ValueError(f"file name {name!r} must be a relative path inside the folder")
    return path


def _write_via_partial(folder: Path, name: str, write: Callable[[Path], None]) -> None:
    """Write under a temporary name and rename, so a crashed export leaves no half file."""
    target = folder / safe_relative_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.partial")
    write(temp)
    os.replace(temp, target)


def write_file(folder: Path, name: str, data: bytes) -> None:
    _write_via_partial(folder, name, lambda path: path.write_bytes(data))


def plan_shards(entries: dict[str, TensorEntry], max_shard_size: int) -> list[list[str]]:
    """Greedy split in name order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, entry in entries.items():
        if shards[-1] and size + entry.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += entry.nbytes
    return shards


def _remove_stale_weights(folder: Path) -> None:
    for path in [*folder.glob("model-*-of-*.safetensors"), folder / WEIGHTS_FILE]:
        path.unlink(missing_ok=True)
    (folder / WEIGHTS_INDEX_FILE).unlink(missing_ok=True)


def write_weights(
    folder: Path,
    entries: dict[str, TensorEntry],
    load: Callable[[TensorEntry], torch.Tensor],
    max_shard_size: int,
    progress: Progress | None,
) -> None:
    _remove_stale_weights(folder)
    shards = plan_shards(entries, max_shard_size)
    names = (
        [WEIGHTS_FILE]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    done, total = 0, len(entries)
    weight_map = {}
    for file_name, shard in zip(names, shards, strict=True):
        tensors = {}
        for tensor_name in shard:
            tensors[tensor_name] = load(entries[tensor_name]).contiguous()
            weight_map[tensor_name] = file_name
            done += 1
            if progress is not None:
                progress(done, total)
        _write_via_partial(
            folder, file_name, partial(save_file, tensors, metadata={"format": "pt"})
        )
    if len(shards) > 1:
        total_size = sum(e.nbytes for e in entries.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        write_file(folder, WEIGHTS_INDEX_FILE, json_file_bytes(index))


def write_folder(
    folder: Path,
    *,
    config: dict[str, Any],
    files: dict[str, bytes],
    entries: dict[str, TensorEntry],
    load: Callable[[TensorEntry], torch.Tensor],
    lineage_record: dict[str, Any],
    model_card: str,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: Progress | None = None,
) -> Path:
    """``files``: tokenizer files, generation config and artifacts by name (config.json is
    written from ``config``, which has the version's overrides applied); ``model_card`` is
    written as README.md after them, so no stored file replaces it."""
    folder.mkdir(parents=True, exist_ok=True)
    write_file(folder, CONFIG_FILE, json_file_bytes(config))
    for name, data in files.items():
        if name != CONFIG_FILE:
            write_file(folder, name, data)
    write_file(folder, MODEL_CARD_FILE, model_card.encode())
    write_weights(folder, entries, load, max_shard_size, progress)
    write_file(folder, LINEAGE_FILE, (json.dumps(lineage_record, indent=2) + "\n").encode())
    return folder


def write_adapter_folder(
    folder: Path, *, files: dict[str, bytes], lineage_record: dict[str, Any], model_card: str
) -> Path:
    """An adapter export: ``files`` (the adapter's own files at the top, tokenizer and other
    stored files beside them; no config.json or weights), the card, the lineage record last."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_file(folder, name, data)
    write_file(folder, MODEL_CARD_FILE, model_card.encode())
    write_file(folder, LINEAGE_FILE, (json.dumps(lineage_record, indent=2) + "\n").encode())
    return folder
