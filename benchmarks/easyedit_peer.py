"""EasyEdit's own ROME (zjunlp/EasyEdit), run from a checkout given at run time, as a peer.

`benchmarks/counterfact.py` times our ROME against EasyEdit's in one process on the same
loaded model, so this module runs EasyEdit's code itself (nothing of it is vendored here):

    peer = load_easyedit_rome(Path("/tmp/easyedit"))
    seconds = peer.edit(model, tokenizer, fact, layer=4)

How it is loaded. `import easyeditor` would run `easyeditor/__init__.py`, which imports the
whole toolkit (editors, trainers, evaluation) and its heavy optional dependencies. Instead,
bare package modules for `easyeditor` and `easyeditor.models` (right `__path__`, no code run)
are put in `sys.modules`, and `easyeditor.models.rome.rome_main` is imported normally; this
runs the real `easyeditor/util/__init__.py` and `easyeditor/models/rome/__init__.py`, which
are light. One module is stubbed when the `datasets` package is missing (it is not installed
here): `easyeditor.models.rome.layer_stats`, which imports `datasets` at the top and is only
called for the second-moment adjustment (`mom2_adjustment`), which the peer configuration
turns off; the stub raises if it is ever called. A fake `datasets` is not used instead
because transformers and peft probe for that package in the same process.

What differs from calling `BaseEditor.edit` (all around EasyEdit's code, not in it):
- hparams start from the checkout's `hparams/ROME/llama-7b.yaml` (EasyEdit's
  `ROMEHyperParams.from_hparams`) with the run's layer and hyperparameters put in, `device`
  set to the model's device (an int there would mean `cuda:N`), and `v_loss_layer` set to
  `num_hidden_layers - 1`;
- for the call only, the tokenizer pads on the right (what `BaseEditor` sets for Llama models
  with ROME; EasyEdit's ROME indexes tokens from the left) and, when it has no pad token,
  pads with its eos token (as `BaseEditor` does for Llama); both are restored afterwards;
- EasyEdit's `set_requires_grad(False, model)` is undone afterwards and the call runs under
  `torch.enable_grad()`, so the caller's model is left as it was apart from the edit;
- EasyEdit's progress prints go to a string buffer (inside the timed call, as printing
  is) unless `quiet=False`.

One runtime patch, for transformers 5 (EasyEdit's requirements.txt pins transformers 5.5.4;
this checkout was tried with 5.23): `rome_main.generate_fast` (the name ROME calls) is
wrapped so that EasyEdit's `generate_fast` sees the model under a name containing "llama".
It passes `attention_mask=None` for models so named and otherwise the mask sliced to the fed
token only; transformers 5 pads such a short 2-D mask with zeros, so every generated token
would attend to position 0 alone (transformers 4 only masked column 0, which these inputs
never need: every token fed is a real one). A Llama model loaded by EasyEdit's `BaseEditor`
must have "llama" in its path, so this is the branch EasyEdit itself takes for Llama models;
the model we are given may be named otherwise (e.g. a GGUF folder). Nothing else needed
patching: EasyEdit's device helpers take "cpu" and nothing in ROME calls `.cuda()`.

Costs to keep in mind when reading its times: EasyEdit builds its context templates by
sampling text with the model (`generate_fast`, 20 samples) on the first edit and caches them
in a module global (`rome_main.CONTEXT_TEMPLATES_CACHE`), so the first edit in a process pays
for that generation and later ones do not (`reset_context_templates` forgets them). The
sampling uses torch's global random state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.machinery
import importlib.util
import io
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

PEER_HPARAMS = "hparams/ROME/llama-7b.yaml"
"""EasyEdit's Llama ROME configuration, relative to the checkout (mom2_adjustment: false)."""

LLAMA_TEMPLATES = {
    "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
    "layer_module_tmp": "model.layers.{}",
    "mlp_module_tmp": "model.layers.{}.mlp",
    "attn_module_tmp": "model.layers.{}.self_attn",
    "ln_f_module": "model.norm",
    "lm_head_module": "lm_head",
}

_PACKAGE = "easyeditor"
_LAYER_STATS = "easyeditor.models.rome.layer_stats"


def _bare_package(name: str, path: Path) -> types.ModuleType:
    """A package module whose `__init__` is not executed, so that only the submodules that
    are imported from it run."""
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(path)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    return module


def _layer_stats_stub() -> types.ModuleType:
    """Stands in for EasyEdit's `layer_stats` (needs `datasets`), which ROME calls only for
    the second-moment adjustment that the peer configuration turns off."""
    module = types.ModuleType(_LAYER_STATS)

    def layer_stats(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "EasyEdit's layer_stats was stubbed because `datasets` is not installed; "
            "mom2_adjustment must stay off"
        )

    module.layer_stats = layer_stats  # type: ignore[attr-defined]
    return module


class _LlamaNamed:
    """The model as `generate_fast` sees it: the same module under a name containing "llama"
    (see the module docstring)."""

    def __init__(self, model: Any) -> None:
        self._model = model

    @property
    def name_or_path(self) -> str:
        return f"llama:{getattr(self._model, 'name_or_path', '')}"

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._model(*args, **kwargs)


def _patch_generate_fast(rome_main: types.ModuleType) -> None:
    """Makes ROME's template generation take EasyEdit's Llama branch (no attention mask);
    done once per process."""
    original = rome_main.generate_fast
    if hasattr(original, "__wrapped__"):
        return

    @functools.wraps(original)
    def generate_fast(model: Any, *args: Any, **kwargs: Any) -> Any:
        return original(_LlamaNamed(model), *args, **kwargs)

    rome_main.generate_fast = generate_fast


def _import_rome(root: Path) -> tuple[types.ModuleType, type]:
    """Imports EasyEdit's `rome_main` and `ROMEHyperParams` without running the package's
    top-level `__init__` files."""
    loaded = sys.modules.get(_PACKAGE)
    if loaded is not None:
        if list(getattr(loaded, "__path__", [])) != [str(root)]:
            raise RuntimeError(f"another easyeditor is already imported: {loaded!r}")
    else:
        before = set(sys.modules)
        try:
            _bare_package(_PACKAGE, root)
            _bare_package(f"{_PACKAGE}.models", root / "models")
            if importlib.util.find_spec("datasets") is None:
                sys.modules[_LAYER_STATS] = _layer_stats_stub()
            importlib.import_module(f"{_PACKAGE}.models.rome.rome_main")
        except BaseException:
            for name in set(sys.modules) - before:
                if name == _PACKAGE or name.startswith(_PACKAGE + "."):
                    del sys.modules[name]
            raise
    rome_main = sys.modules[f"{_PACKAGE}.models.rome.rome_main"]
    hparams_module = sys.modules[f"{_PACKAGE}.models.rome.rome_hparams"]
    return rome_main, hparams_module.ROMEHyperParams


def load_easyedit_rome(checkout: Path, *, quiet: bool = True) -> EasyEditRome:
    """Loads EasyEdit's ROME from a checkout of zjunlp/EasyEdit (the directory that holds
    `easyeditor/` and `hparams/`), with the peer configuration read from its Llama yaml."""
    checkout = Path(checkout).resolve()
    root = checkout / _PACKAGE
    if not (root / "models" / "rome" / "rome_main.py").is_file():
        raise FileNotFoundError(f"no EasyEdit ROME under {checkout}")
    rome_main, hparams_cls = _import_rome(root)
    _patch_generate_fast(rome_main)
    base = hparams_cls.from_hparams(str(checkout / PEER_HPARAMS))
    return EasyEditRome(rome_main, base, quiet=quiet)


class EasyEditRome:
    """EasyEdit's ROME entry point with the peer hyperparameters; see the module docstring
    for what is set around the call."""

    def __init__(self, rome_main: types.ModuleType, base_hparams: Any, *, quiet: bool) -> None:
        self.rome_main = rome_main
        self.base_hparams = base_hparams
        self.quiet = quiet

    @property
    def context_templates(self) -> list[str] | None:
        """EasyEdit's cached context templates (None until the first edit builds them)."""
        return self.rome_main.CONTEXT_TEMPLATES_CACHE

    def reset_context_templates(self) -> None:
        """Forgets the cached templates, so the next edit generates them again (its cost is
        then part of that edit's time, as for the first edit in a process)."""
        self.rome_main.CONTEXT_TEMPLATES_CACHE = None

    def hparams(self, model: Any, *, layer: int, **overrides: Any) -> Any:
        """The `ROMEHyperParams` of one edit: the yaml's, with this model's layer count and
        device, the Llama module names and the given values."""
        device = next(model.parameters()).device
        return dataclasses.replace(
            self.base_hparams,
            **LLAMA_TEMPLATES,
            layers=[layer],
            fact_token="subject_last",
            v_loss_layer=model.config.num_hidden_layers - 1,
            mom2_adjustment=False,
            device=str(device),
            model_name=getattr(model, "name_or_path", "") or "model",
            model_parallel=False,
            fp16=False,
            **overrides,
        )

    def edit(
        self,
        model: Any,
        tokenizer: Any,
        fact: dict,
        *,
        layer: int,
        v_steps: int = 25,
        v_lr: float = 0.5,
        kl_factor: float = 0.0625,
        clamp: float = 4.0,
        weight_decay: float = 1e-3,
    ) -> float:
        """Apply EasyEdit's ROME for this fact to `model` in place (like its apply_rome_to_model
        with copy=False, return_orig_weights not needed); returns wall seconds.

        `fact` has CounterFact's fields: `prompt` (with `{}` for the subject, or the subject
        written out), `subject`, `target_new` and optionally `ground_truth`. EasyEdit puts a
        space before `target_new` itself, so surrounding whitespace is stripped from it. Only
        the `apply_rome_to_model` call is timed (first call: with its template generation).
        """
        dtype = next(model.parameters()).dtype
        if dtype != torch.float32:
            raise ValueError(f"the peer measurement is fp32, the model is {dtype}")
        hparams = self.hparams(
            model,
            layer=layer,
            v_num_grad_steps=v_steps,
            v_lr=v_lr,
            kl_factor=kl_factor,
            clamp_norm_factor=clamp,
            v_weight_decay=weight_decay,
        )
        request = {
            "prompt": fact["prompt"],
            "subject": fact["subject"],
            "target_new": fact["target_new"].strip(),
            "ground_truth": fact.get("ground_truth"),
        }
        grads = [p.requires_grad for p in model.parameters()]
        padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
        tokenizer.padding_side = "right"
        if pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        out = io.StringIO() if self.quiet else sys.stdout
        try:
            with torch.enable_grad(), contextlib.redirect_stdout(out):
                start = time.perf_counter()
                self.rome_main.apply_rome_to_model(
                    model, tokenizer, [request], hparams, copy=False, return_orig_weights=False
                )
                seconds = time.perf_counter() - start
        finally:
            tokenizer.padding_side = padding_side
            if pad_token is None:
                tokenizer.pad_token = None
            for p, g in zip(model.parameters(), grads, strict=True):
                p.requires_grad_(g)
        return seconds
