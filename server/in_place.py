"""A job's edits made on the shared warm model itself, and undone after it.

A worker keeps each warm model's weights once: a job does not copy the model, it edits it and
puts it back. ``InPlaceEdit`` remembers, by reference (no tensor is copied), what the model was
made of when the job started: each module's parameters, buffers, children, hooks and training
flag, each tensor's version counter and storage, each parameter's ``requires_grad`` and
``grad``, and the config's values. ``restore`` puts all of it back:

1. modules, parameters and buffers that an operation replaced or added (a structured prune's
   smaller layers, a baked bias, peft's wrappers) are swapped back for the remembered ones;
2. remembered tensors written in place (their version counter moved, their storage was
   swapped by ``.data =``, or an operation named them in ``SurgeryResult.changed``) are read
   back from the base version in the store, one at a time, which is what the warm model was
   loaded from, bit for bit;
3. the config, hooks, flags and gradients are set back.

So a job costs the weights once, plus the tensors it changes (and, for shape-changing
operations, the smaller layers: a replaced layer is let go as soon as the operation sets it
aside, else once the operation returns, and read back from the store when the model is put
back). ``base_view`` puts the base back for a while (the judge reading its reference) and the
job's edits back after.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelsurgery.editing.registry import PutBack, keep_aside

ReadOriginal = Callable[[str], torch.Tensor | None]
"""The base version's tensor by state-dict name (None: the store has no such tensor)."""


class RestoreError(RuntimeError):
    """A written tensor could not be read back: the warm model must not be used again."""


@dataclass
class _ModuleState:
    module: nn.Module
    parameters: dict[str, nn.Parameter | None]
    buffers: dict[str, torch.Tensor | None]
    children: dict[str, nn.Module | None]
    hooks: dict[str, dict[int, Any]]
    training: bool


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _module_states(model: nn.Module) -> list[_ModuleState]:
    return [
        _ModuleState(
            module=module,
            parameters=dict(module._parameters),
            buffers=dict(module._buffers),
            children=dict(module._modules),
            hooks={name: dict(getattr(module, name)) for name in _HOOK_DICTS},
            training=module.training,
        )
        for module in model.modules()
    ]


def _apply_states(states: list[_ModuleState]) -> None:
    for state in states:
        module = state.module
        module._parameters.clear()
        module._parameters.update(state.parameters)
        module._buffers.clear()
        module._buffers.update(state.buffers)
        module._modules.clear()
        module._modules.update(state.children)
        for name, hooks in state.hooks.items():
            current = getattr(module, name)
            current.clear()
            current.update(hooks)
        module.training = state.training


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under each of its names (tied ones under all of them)."""
    named: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


def _fingerprint(tensor: torch.Tensor) -> tuple[int, int]:
    """What an in-place write moves: the version counter (``add_``, ``copy_``, ``+=``) or the
    storage (``param.data = new``)."""
    return tensor._version, tensor.data_ptr()


class InPlaceEdit:
    """Undo journal of one job on a warm model (see the module docstring)."""

    def __init__(self, model: nn.Module, read_original: ReadOriginal) -> None:
        self.model = model
        self._read_original = read_original
        self._states = _module_states(model)
        self._tensors = _named_tensors(model)
        self._fingerprints = {id(t): _fingerprint(t) for t in self._tensors.values()}
        self._parameters = {
            id(p): (p, p.requires_grad, p.grad)
            for _, p in model.named_parameters(remove_duplicate=False)
        }
        self._config = copy.deepcopy(vars(model.config))
        self._named: set[str] = set()
        self._released: dict[int, torch.Size] = {}  # parameters let go: id -> shape

    def note_changed(self, names: Iterable[str]) -> None:
        """Names an operation reported changing (``SurgeryResult.changed``): read back even
        when the write left no trace the journal sees."""
        self._named.update(names)

    def written(self) -> dict[str, torch.Tensor]:
        """The remembered tensors written since the job began, one name each."""
        out: dict[int, tuple[str, torch.Tensor]] = {}
        for name, tensor in self._tensors.items():
            moved = _fingerprint(tensor) != self._fingerprints[id(tensor)]
            held = id(tensor) not in self._released
            if (moved or name in self._named) and held and id(tensor) not in out:
                out[id(tensor)] = (name, tensor)
        return dict(out.values())

    def let_go_of_replaced(self) -> None:
        """Free the remembered parameters an operation took out of the model (a structured
        prune's full-size layers, now smaller ones): ``restore`` and ``base_view`` read them
        back from the store, so the job does not hold both sizes of those layers."""
        live = {id(p) for p in self.model.parameters()}
        for name, tensor in self._tensors.items():
            gone = isinstance(tensor, nn.Parameter) and id(tensor) not in live
            if gone and id(tensor) not in self._released and self._read_original(name) is not None:
                self._let_go(tensor)

    def _let_go(self, tensor: torch.Tensor) -> None:
        self._released[id(tensor)] = tensor.shape
        tensor.data = tensor.data.new_empty(0)

    def _bring_back_released(self) -> list[torch.Tensor]:
        """The parameters let go, read back from the store; returns them."""
        back = []
        for name, tensor in self._tensors.items():
            if id(tensor) in self._released:
                self._bring_back(tensor, [name, *self._names_of(tensor)])
                back.append(tensor)
        return back

    def _bring_back(self, tensor: torch.Tensor, names: list[str]) -> None:
        shape = self._released.pop(id(tensor))
        tensor.data = self._original(names, shape).to(device=tensor.device, dtype=tensor.dtype)
        self._fingerprints[id(tensor)] = _fingerprint(tensor)
        self._named.difference_update(names)

    def restore(self) -> None:
        """Put the model back as the job found it (module docstring, steps 1-3)."""
        # 1. Structure: the remembered modules, parameters and buffers, by reference (those
        #    let go read back from the store).
        _apply_states(self._states)
        self._bring_back_released()
        # 2. Values written in place, read back from the store.
        with torch.no_grad():
            for name, tensor in self.written().items():
                self._read_back(name, tensor)
        # 3. Config, gradients and flags.
        self._reset_config_and_flags()
        self._fingerprints = {id(t): _fingerprint(t) for t in self._tensors.values()}
        self._named.clear()

    def _reset_config_and_flags(self) -> None:
        vars(self.model.config).clear()
        vars(self.model.config).update(copy.deepcopy(self._config))
        for parameter, requires_grad, grad in self._parameters.values():
            parameter.requires_grad_(requires_grad)
            parameter.grad = grad

    def set_aside(self, parameter: nn.Parameter) -> PutBack:
        """``MethodContext.set_aside``: a parameter the job has not written is let go, and
        put back as the base version's tensor read from the store (memory-mapped, so reading
        it costs no copy); a written one, or one the journal does not know, is kept. One an
        operation has taken out of the model (a structured prune's full-size layer, replaced
        by its smaller one) is let go here and now, as ``let_go_of_replaced`` would once the
        operation returns: a layer-by-layer prune holds both sizes of one layer at most."""
        names = self._names_of(parameter)
        if id(parameter) in self._released:
            return lambda: self._bring_back(parameter, names)
        written = _fingerprint(parameter) != self._fingerprints.get(id(parameter))
        if not names or written or self._named.intersection(names):
            return keep_aside(parameter)
        replaced = all(parameter is not p for p in self.model.parameters())
        if replaced and self._read_original(names[0]) is not None:
            self._let_go(parameter)
            return lambda: self._bring_back(parameter, names)
        device, dtype, shape = parameter.device, parameter.dtype, parameter.shape

        def put_back() -> None:
            original = self._original(names, shape)
            parameter.data = original.to(device=device, dtype=dtype)
            self._fingerprints[id(parameter)] = _fingerprint(parameter)

        return put_back

    def _names_of(self, tensor: torch.Tensor) -> list[str]:
        return [n for n, t in self._tensors.items() if t is tensor]

    def _original(self, names: list[str], shape: torch.Size) -> torch.Tensor:
        original = next((t for t in map(self._read_original, names) if t is not None), None)
        if original is None or original.shape != shape:
            raise RestoreError(f"tensor {names[0]!r} of the warm model cannot be read back")
        return original

    def _read_back(self, name: str, tensor: torch.Tensor) -> None:
        original = self._original([name, *self._names_of(tensor)], tensor.shape)
        tensor.copy_(original.to(device=tensor.device, dtype=tensor.dtype))

    @contextmanager
    def base_view(self) -> Iterator[None]:
        """The model as the job found it while the block runs, the job's edits after.

        Nothing is copied: a tensor written in place hands its storage aside and holds the base
        version's tensor from the store (memory-mapped) meanwhile, then gets its storage back;
        replaced modules are swapped by reference. The transient cost of a reading is the
        store's pages of the tensors the job changed, as far as it reads them."""
        edited_states = _module_states(self.model)
        written = self.written()
        named = set(self._named)
        config = copy.deepcopy(vars(self.model.config))
        flags = {
            id(p): (p, p.requires_grad, p.grad)
            for _, p in self.model.named_parameters(remove_duplicate=False)
        }
        _apply_states(self._states)
        brought_back = self._bring_back_released()
        edited: dict[str, torch.Tensor] = {}
        for name, tensor in written.items():
            edited[name] = tensor.data
            original = self._original([name, *self._names_of(tensor)], tensor.shape)
            tensor.data = original.to(device=tensor.device, dtype=tensor.dtype)
        self._reset_config_and_flags()
        try:
            yield
        finally:
            _apply_states(edited_states)
            for name, data in edited.items():
                written[name].data = data
            for tensor in brought_back:
                self._released[id(tensor)] = tensor.shape
                tensor.data = tensor.data.new_empty(0)
            vars(self.model.config).clear()
            vars(self.model.config).update(config)
            for parameter, requires_grad, grad in flags.values():
                parameter.requires_grad_(requires_grad)
                parameter.grad = grad
            self._named = named | set(edited)
