"""GGUF files through transformers: dequantised float weights, the tokenizer from the same file.

Dequantising takes seconds to minutes, so the dequantised model is kept once per file content
(its SHA-256) as a plain safetensors folder under ``$MODELSURGERY_CACHE`` (default
``$MODELSURGERY_HOME/cache/models``, beside the store, so a scratch home keeps it too); later
loads read that folder instead (about 20x faster). Keying by content, not path, means the same
file installed in a new virtual environment reuses the folder instead of adding another copy
(CI's fresh clones had left fifteen 517 MB copies of SmolLM2). The file is hashed once per (path,
size, mtime); a small index file remembers the digest.

The config is read from the GGUF metadata alone (transformers' gguf config reader, no tensors
dequantised) and cached per file (path, size, mtime), because a server validates many specs
against the same base model.

That reader builds Python objects for every metadata item and tensor a file declares, so before
any of it runs the header, the metadata and the tensor list are walked here (without building
anything) and checked against the file's size and the bounds in ``proto.limits``. A file refused
then, or one transformers cannot parse, is remembered per (path, size, mtime) as well: a bad file
costs one walk, not one per submit.

The config must come from the file: where the metadata leaves out a size, transformers fills in
its config class's default (Llama-7B's for a 69-byte ``llama`` file, which a worker then tried to
build in float32 and was OOM-killed). So the walk refuses metadata without the architecture's
shape keys, and the config is refused unless the file's tensors hold the parameters of the model
it describes (counted on the meta device, within one embedding matrix: tied or not, plus small
extras such as ``rope_freqs``). The worker builds its model from that checked config, so it never
builds one larger than the file's tensors.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import mmap
import os
import re
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from modelsurgery.checkpoints.atomic import atomic_write
from modelsurgery.models.aliases import models_cache_dir
from modelsurgery.models.errors import ModelReferenceError
from modelsurgery.proto.limits import (
    MAX_GGUF_ARRAY_ITEMS,
    MAX_GGUF_METADATA_ITEMS,
    MAX_GGUF_METADATA_KEYS,
    MAX_GGUF_NAME_BYTES,
    MAX_GGUF_TENSORS,
)

try:  # transformers >= 5 keeps GGUF weights packed unless asked to dequantise
    from transformers import GgufConfig
except ImportError:  # pragma: no cover - older transformers always dequantises
    GgufConfig = None


GGUF_VERSIONS = (2, 3)
"""The versions transformers reads (version 1 had 32-bit counts)."""
GGML_MAX_DIMS = 4
MAX_ARRAY_DEPTH = 2
"""An array of arrays at most: the reader recurses per item, and real files nest none."""
HEADER = struct.Struct("<4sIQQ")
# Fewest bytes a metadata entry takes (key length, value type, a one-byte value), a tensor's
# entry (name length, dimension count, type, offset) and an array's header (item type, length).
MIN_KV_BYTES = 8 + 4 + 1
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
ARRAY_HEADER_BYTES = 4 + 8
STRING_TYPE, ARRAY_TYPE = 8, 9
# Value type -> size in bytes, for the fixed-size types (u8 i8 u16 i16 u32 i32 f32 bool, u64 i64
# f64); a string is its 8-byte length and its bytes.
SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
# Value type -> struct code, for the integer types (whose values the shape checks read).
INTEGER_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 10: "Q", 11: "q"}
MAX_KEPT_KEY_BYTES = 256
"""Longer metadata keys are walked but not kept: no key the checks look for is that long."""
ARCHITECTURE_KEY = "general.architecture"
SHAPE_KEYS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
"""``<arch>.<key>``: required where transformers reads the key for the architecture (it fills a
missing one with its config class's default, another model's size)."""
VOCABULARY_KEYS = ("vocab_size", "tokenizer.ggml.tokens")
"""``<arch>.vocab_size``, or else the token list whose length transformers takes for it."""
MAX_GGUF_BLOCKS = 1024
"""Blocks (layers) one file may declare (real models have under 200); bounds the meta-device
build that counts the described model's parameters (about a millisecond a block)."""
# What transformers' GGUF readers raise on a malformed file, and its config classes on sizes
# that do not fit together (a zero head count divides by zero).
PARSE_ERRORS = (
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    OverflowError,
    ZeroDivisionError,
    StrictDataclassError,
    struct.error,
)
# What building a model from a config that holds nonsense (a negative or non-integer size)
# raises.
BUILD_ERRORS = (*PARSE_ERRORS, RuntimeError)


class _Refused(Exception):
    """What is wrong with a GGUF file, in words for the caller."""


@dataclass(frozen=True)
class _Walked:
    """What the walk learnt of a file that passed it, for checking its config."""

    architecture: str | None
    integers: dict[str, int]
    """Integer metadata values by key."""
    tensors: int
    elements: int
    """Elements of all tensors together, from their declared shapes."""


def check_gguf(path: Path, reference: str | None = None) -> None:
    """Refuse (``ModelReferenceError`` naming ``reference``) a file whose header or metadata
    lies about its size, passes the bounds or leaves out the model's shape, before any reader
    builds objects for it."""
    stat = path.stat()
    walked = _walked(str(path), stat.st_size, stat.st_mtime_ns)
    if isinstance(walked, str):
        raise _refused(path, reference, walked)


def load_gguf_config(path: Path, reference: str | None = None) -> PretrainedConfig:
    """The model config from the file's metadata, once its tensors are known to hold the model
    it describes (a few seconds once, then cached)."""
    stat = path.stat()
    config = _cached_config(str(path), stat.st_size, stat.st_mtime_ns)
    if isinstance(config, str):
        raise _refused(path, reference, config)
    return copy.deepcopy(config)


@functools.lru_cache(maxsize=32)
def _cached_config(path: str, size: int, mtime_ns: int) -> PretrainedConfig | str:
    """The config, or what is wrong with the file (kept too, so it is not parsed again)."""
    walked = _walked(path, size, mtime_ns)
    if isinstance(walked, str):
        return walked
    file = Path(path)
    try:
        config = AutoConfig.from_pretrained(
            file.parent, gguf_file=file.name, trust_remote_code=False
        )
    except PARSE_ERRORS as exc:
        return _unparsable(file, exc)
    return _size_problem(walked, config) or config


def _size_problem(walked: _Walked, config: PretrainedConfig) -> str | None:
    """Why the file's tensors do not hold the model ``config`` describes, or None.

    The model is built on the meta device (no memory) and its parameters counted: with its
    embedding counted once (tied) the file must hold at least that many, and at most one
    embedding more than the model holds (an untied output, small extras like ``rope_freqs``)."""
    if walked.architecture is not None:
        key = f"{walked.architecture}.block_count"
        blocks = walked.integers.get(key, 0)
        if blocks > MAX_GGUF_BLOCKS:
            return (
                f"its metadata declares {blocks:,} blocks; the most accepted is {MAX_GGUF_BLOCKS:,}"
            )
        if blocks > walked.tensors:
            return f"its metadata declares {blocks:,} blocks ({key}) for {walked.tensors:,} tensors"
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        held = sum(parameter.numel() for parameter in model.parameters())
        inputs = model.get_input_embeddings().weight
    except BUILD_ERRORS as exc:
        problem = f"{type(exc).__name__}: {exc}"
        return f"its metadata does not describe a model this server builds ({problem})"
    embedding = inputs.numel()
    output = model.get_output_embeddings()
    tied = output is None or output.weight is inputs
    least = held if tied else held - embedding
    if least <= walked.elements <= held + embedding:
        return None
    return (
        f"its tensors hold {walked.elements:,} parameters; the model its metadata describes "
        f"holds {held:,}"
    )


def _unparsable(path: Path, exc: BaseException) -> str:
    """A parser's complaint about ``path``, without the server's folders."""
    complaint = str(exc).replace(str(path), path.name).replace(str(path.parent), "<folder>")
    return f"it does not parse ({type(exc).__name__}: {complaint})"


def _refused(path: Path, reference: str | None, problem: str) -> ModelReferenceError:
    name = str(path) if reference is None else reference
    return ModelReferenceError(
        f"model reference {name!r} is not a GGUF file this server reads: {problem}"
    )


@functools.lru_cache(maxsize=64)
def _walked(path: str, size: int, _mtime_ns: int) -> _Walked | str:
    """What the walk learnt, or what ``check_gguf`` refuses the file for; kept per (path, size,
    mtime)."""
    if size < HEADER.size:
        return f"it is {size} bytes, shorter than a GGUF header"
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        walk = _GGUFWalk(data, len(data))
        try:
            walk.check()
        except _Refused as exc:
            return str(exc)
    return _Walked(walk.architecture, walk.integers, walk.tensors, walk.elements)


def _formats(order: str) -> dict[str, struct.Struct]:
    """Readers of the lengths, counts and integer values in one byte order."""
    return {code: struct.Struct(order + code) for code in {"I", "Q", *INTEGER_CODES.values()}}


class _GGUFWalk:
    """One pass over a GGUF file's header, metadata and tensor list that reads only lengths,
    counts, types, integer values and tensor shapes (fixed-size arrays are skipped, not read)."""

    def __init__(self, data: mmap.mmap, size: int) -> None:
        self.data = data
        self.size = size
        self.offset = 0
        self.items = 0
        self.formats = _formats("<")
        self.keys: set[str] = set()
        self.integers: dict[str, int] = {}
        self.architecture: str | None = None
        self.tensors = 0
        self.elements = 0

    def check(self) -> None:
        magic, version, tensors, kvs = HEADER.unpack_from(self.data, 0)
        if magic != b"GGUF":
            raise _Refused("it does not start with the GGUF magic")
        if version & 0xFFFF == 0:  # written on a big-endian machine
            self.formats = _formats(">")
            _, version, tensors, kvs = struct.unpack_from(">4sIQQ", self.data, 0)
        if version not in GGUF_VERSIONS:
            raise _Refused(f"GGUF version {version} (this server reads versions 2 and 3)")
        self.offset = HEADER.size
        self._count(tensors, "tensors", MAX_GGUF_TENSORS, MIN_TENSOR_INFO_BYTES)
        self._count(kvs, "metadata entries", MAX_GGUF_METADATA_KEYS, MIN_KV_BYTES)
        for index in range(kvs):
            key, shown = self._name(f"metadata entry {index}")
            value_type = self._unpack("I", f"metadata {shown}")
            self._entry(key, value_type, shown)
        for index in range(tensors):
            _, name = self._name(f"tensor {index}")
            dims = self._unpack("I", f"tensor {name}")
            if dims > GGML_MAX_DIMS:
                raise _Refused(f"tensor {name} has {dims:,} dimensions (at most {GGML_MAX_DIMS})")
            shape = [self._unpack("Q", f"tensor {name}") for _ in range(dims)]
            self._skip(4 + 8, f"tensor {name}")
            self.elements += math.prod(shape)
        self.tensors = tensors
        self._check_shape_keys()

    def _entry(self, key: str | None, value_type: int, shown: str) -> None:
        """Walk one metadata value, keeping the architecture's name and integer values."""
        if key is not None:
            self.keys.add(key)
        if key == ARCHITECTURE_KEY and value_type == STRING_TYPE:
            length = self._unpack("Q", f"metadata {shown}")
            start = self.offset
            self._skip(length, f"metadata {shown}")
            if length <= MAX_KEPT_KEY_BYTES:
                self.architecture = self.data[start : start + length].decode("utf-8", "replace")
        elif key is not None and value_type in INTEGER_CODES:
            self.integers[key] = self._unpack(INTEGER_CODES[value_type], f"metadata {shown}")
        else:
            self._value(value_type, shown, depth=0)

    def _check_shape_keys(self) -> None:
        """Refuse metadata without a shape key transformers reads for the architecture (it
        would fill in another model's size)."""
        known = _config_keys(self.architecture)
        if known is None:
            return  # no architecture, or one transformers refuses or checks itself
        arch = self.architecture
        missing = [
            f"{arch}.{key}"
            for key in SHAPE_KEYS
            if key in known and f"{arch}.{key}" not in self.keys
        ]
        vocabulary, tokens = f"{arch}.{VOCABULARY_KEYS[0]}", VOCABULARY_KEYS[1]
        if vocabulary not in self.keys and tokens not in self.keys:
            missing.append(f"{vocabulary} (or {tokens})")
        if missing:
            raise _Refused(
                f"its metadata lacks {', '.join(missing)}; this server takes a model's shape "
                "from the file, not from defaults"
            )

    def _count(self, count: int, what: str, most: int, each: int) -> None:
        if count > most:
            raise _Refused(f"its header declares {count:,} {what}; the most accepted is {most:,}")
        if count * each > self.size - HEADER.size:
            raise _Refused(
                f"its header declares {count:,} {what}, more than its {self.size:,} bytes can hold"
            )

    def _unpack(self, code: str, where: str) -> int:
        layout = self.formats[code]
        if self.offset + layout.size > self.size:
            raise _Refused(f"it ends inside {where}")
        (value,) = layout.unpack_from(self.data, self.offset)
        self.offset += layout.size
        return int(value)

    def _skip(self, length: int, where: str) -> None:
        if length > self.size - self.offset:
            raise _Refused(f"it ends inside {where}")
        self.offset += length

    def _name(self, where: str) -> tuple[str | None, str]:
        """A key or tensor name (None when too long to keep) and how messages show it
        (shortened)."""
        length = self._unpack("Q", where)
        if length > MAX_GGUF_NAME_BYTES:
            raise _Refused(
                f"{where} has a name of {length:,} bytes (at most {MAX_GGUF_NAME_BYTES:,})"
            )
        start = self.offset
        self._skip(length, where)
        shown = repr(self.data[start : start + min(length, 64)].decode("utf-8", "replace"))
        if length > MAX_KEPT_KEY_BYTES:
            return None, shown
        return self.data[start : start + length].decode("utf-8", "replace"), shown

    def _value(self, value_type: int, key: str, depth: int) -> None:
        """Skip one value of ``value_type`` (``key`` is how messages show its entry)."""
        where = f"metadata {key}"
        if value_type in SCALAR_BYTES:
            self._skip(SCALAR_BYTES[value_type], where)
        elif value_type == STRING_TYPE:
            self._skip(self._unpack("Q", where), where)
        elif value_type == ARRAY_TYPE:
            self._array(key, depth + 1)
        else:
            raise _Refused(f"{where} has unknown value type {value_type}")

    def _array(self, key: str, depth: int) -> None:
        where = f"metadata {key}"
        if depth > MAX_ARRAY_DEPTH:
            raise _Refused(f"{where} nests arrays deeper than {MAX_ARRAY_DEPTH}")
        item_type = self._unpack("I", where)
        if item_type not in SCALAR_BYTES and item_type not in (STRING_TYPE, ARRAY_TYPE):
            raise _Refused(f"{where} is an array of unknown item type {item_type}")
        length = self._unpack("Q", where)
        if length > MAX_GGUF_ARRAY_ITEMS:
            raise _Refused(
                f"{where} is an array of {length:,} items; the most accepted is "
                f"{MAX_GGUF_ARRAY_ITEMS:,}"
            )
        smallest = SCALAR_BYTES.get(
            item_type, 8 if item_type == STRING_TYPE else ARRAY_HEADER_BYTES
        )
        if length * smallest > self.size - self.offset:
            raise _Refused(
                f"{where} declares {length:,} items, more than the rest of the file can hold"
            )
        self.items += length * (2 if item_type == STRING_TYPE else 1)
        if self.items > MAX_GGUF_METADATA_ITEMS:
            raise _Refused(
                f"its metadata arrays hold more than {MAX_GGUF_METADATA_ITEMS:,} items together"
            )
        if item_type in SCALAR_BYTES:
            self._skip(length * SCALAR_BYTES[item_type], where)
        elif item_type == STRING_TYPE:
            for _ in range(length):
                self._skip(self._unpack("Q", where), where)
        else:
            for _ in range(length):
                self._value(item_type, key, depth)


def _config_keys(architecture: str | None) -> frozenset[str] | None:
    """The ``<arch>.`` keys transformers' GGUF config reader takes for ``architecture`` (None
    for one it has no key table for)."""
    if architecture is None:
        return None
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    # llama.cpp's names for some architectures are transformers' without the separator.
    name = re.sub(r"(\d)moe$", r"\1_moe", architecture.replace("-", "_"))
    table = GGUF_CONFIG_MAPPING.get(name)
    return None if table is None else frozenset(table)


def load_gguf_model(
    path: Path, dtype: torch.dtype | None = None, config: PretrainedConfig | None = None
) -> PreTrainedModel:
    """A plain dense model: weights dequantised (float32 unless ``dtype`` says otherwise) and
    the quantization marker removed so ``save_pretrained`` and the store accept it.

    The model is built from the checked config (``load_gguf_config``), never from one
    transformers fills in with defaults while loading."""
    if config is None:
        config = load_gguf_config(path)
    kwargs: dict[str, object] = {
        "config": config,
        "gguf_file": path.name,
        "trust_remote_code": False,
    }
    if GgufConfig is not None:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
    drop_quantization(model)
    return model


def load_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    check_gguf(path)
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
    """Where the dequantised copy of this file's content lives (it may not exist yet)."""
    return cache_root() / "gguf" / content_digest(path)[:32]


def content_digest(path: Path) -> str:
    """SHA-256 of the file, read from the index while the file's path, size and mtime stand."""
    stat = path.stat()
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    index = cache_root() / "gguf" / "index" / hashlib.sha256(key.encode()).hexdigest()[:32]
    if index.is_file():
        return index.read_text().strip()
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    atomic_write(index, digest.encode(), tmp_dir=index.parent)
    return digest


def load_gguf(
    path: Path, dtype: torch.dtype | None = None, reference: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer of a GGUF file, through the dequantised-folder cache."""
    folder = dequantized_folder(path)
    if not folder.is_dir():
        config = load_gguf_config(path, reference)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if not folder.is_dir():
                _write_dequantized(path, folder, config)
    kwargs: dict[str, object] = {"trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def _write_dequantized(path: Path, folder: Path, config: PretrainedConfig) -> None:
    """Dequantise once into a temp folder, then rename: a folder that exists is complete."""
    partial = folder.with_name(f"{folder.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        load_gguf_model(path, config=config).save_pretrained(partial)
        load_gguf_tokenizer(path).save_pretrained(partial)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
