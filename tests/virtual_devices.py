"""Two accelerator devices on a CPU-only machine, for tests of device handling.

A model placed over several GPUs fails with "Expected all tensors to be on the same device"
wherever a method computes with a tensor from one layer's device and one from another's. This
machine has no second device, so ``VirtualDevices`` pretends to have some: tensors stay in CPU
memory, but each carries a device label (``ve:0``, ``ve:1``: a device type no library here
special-cases) kept per storage (weakly: it dies with the storage), so a view, a ``.data``
swap or an ``nn.Parameter`` made from a tensor keeps its label.

Inside the mode a tensor reports its label as ``.device``; ``.to(device)``, ``.cpu()`` and
factories given a ``device`` move or create labelled copies; every other operation checks that
its tensor arguments share one device, as CUDA does (0-dim CPU tensors and Python scalars may
join any device; indexing takes CPU indices), raises ``RuntimeError`` when they do not, and
labels its outputs with that device. ``numpy()`` of a non-CPU tensor raises, as it does on CUDA;
``torch.autograd.grad`` may cross devices and gives each gradient its input's device.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

VIRTUAL_TYPE = "ve"
_CPU = torch.device("cpu")
_MOVES = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda}
_MIXED_OK = {
    torch.Tensor.copy_,
    torch.Tensor.new_empty,
    torch.Tensor.new_zeros,
    torch.Tensor.new_ones,
    torch.Tensor.new_full,
    torch.Tensor.new_tensor,
    torch._has_compatible_shallow_copy_type,
}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
_FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.tensor,
    torch.as_tensor,
    torch.randn,
    torch.rand,
    torch.randint,
    torch.eye,
    torch.linspace,
    torch.empty_strided,
}
_LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like}
_LIKE |= {torch.randn_like}


def _key(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    """The storage a label belongs to (torch keeps one Python object per storage, so a weak
    key dies with the storage and a freed address never inherits a stale label)."""
    if tensor.is_meta:
        return None
    return tensor.untyped_storage()


class VirtualDevices(TorchFunctionMode):
    """See the module docstring. ``place(tensor, "ve:1")`` labels a CPU tensor in place."""

    def __init__(self) -> None:
        super().__init__()
        self._labels: weakref.WeakKeyDictionary[torch.UntypedStorage, torch.device] = (
            weakref.WeakKeyDictionary()
        )

    def __enter__(self) -> VirtualDevices:
        """Also lets ``torch.autocast("ve")`` be the CPU's autocast (the one these tensors
        really run under), as ``torch.autocast("cuda")`` is on a GPU."""
        original = self._autocast_init = torch.autocast.__init__

        def init(autocast: Any, device_type: str, *args: Any, **kwargs: Any) -> None:
            real = "cpu" if device_type == VIRTUAL_TYPE else device_type
            original(autocast, real, *args, **kwargs)

        torch.autocast.__init__ = init  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.autocast.__init__ = self._autocast_init  # type: ignore[method-assign]
        super().__exit__(*exc)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Plain torch while the block runs (what it creates is on the CPU, unlabelled)."""
        with torch.overrides._pop_mode_temporarily():
            yield

    def plain(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function`` run with the mode paused: transformers' loader builds a model on the
        meta device and fills it in ways this mode does not follow, and the tests here are
        about what happens once a loaded model is placed."""

        def call(*args: Any, **kwargs: Any) -> Any:
            with self.paused():
                return function(*args, **kwargs)

        return call

    # --- labels ---------------------------------------------------------------------------
    def device_of(self, tensor: torch.Tensor) -> torch.device:
        """The tensor's label, else its real device (a meta tensor stays on meta)."""
        key = _key(tensor)
        return self._labels.get(key, tensor.device) if key is not None else tensor.device

    def _label(self, tensor: torch.Tensor, device: torch.device) -> None:
        key = _key(tensor)
        if key is None:
            return
        if device.type == VIRTUAL_TYPE:
            self._labels[key] = device
        else:
            self._labels.pop(key, None)

    def place(self, tensor: torch.Tensor, device: str | torch.device) -> None:
        self._label(tensor, torch.device(device))

    # --- the mode ---------------------------------------------------------------------------
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        owner = getattr(func, "__self__", None)
        name = getattr(func, "__name__", "")
        if name == "__get__" and owner is not None:
            return self._attribute(owner.__name__, args[0], func)
        if name == "__set__":  # ``param.data = tensor`` may change its device
            return func(*args, **kwargs)
        if func in _MOVES:
            return self._move(func, args, kwargs)
        if func in _FACTORIES or func in _LIKE:
            return self._create(func, args, kwargs)
        if func is torch.autograd.grad:
            return self._gradients(func, args, kwargs)
        if func is torch.Tensor.numpy and self.device_of(args[0]).type == VIRTUAL_TYPE:
            raise TypeError(f"can't convert {self.device_of(args[0])} tensor to numpy")
        if func in _INDEXING:
            device = self._indexing_device(args)
        elif func in _MIXED_OK:  # the result is on the device of the tensor operated on
            device = self.device_of(args[0]) if isinstance(args[0], torch.Tensor) else None
        else:
            device = self._common_device(func, args, kwargs)
        out = func(*args, **kwargs)
        if device is not None:
            for tensor in _tensors(out):
                self._label(tensor, device)
        return out

    def _gradients(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Autograd crosses devices: each gradient is on its input's device."""
        grads = func(*args, **kwargs)
        inputs = kwargs.get("inputs", args[1] if len(args) > 1 else None)
        inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
        for grad, given in zip(grads, inputs, strict=True):
            if grad is not None:
                self._label(grad, self.device_of(given))
        return grads

    def _attribute(self, name: str, tensor: torch.Tensor, getter: Any) -> Any:
        if name == "device":
            return self.device_of(tensor)
        if name == "is_cpu":
            return self.device_of(tensor).type == "cpu"
        value = getter(tensor)
        if name == "grad" and value is not None:
            self._label(value, self.device_of(tensor))
        return value

    def _move(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        tensor, rest = args[0], list(args[1:])
        source = self.device_of(tensor)
        target = self._target(func, rest, kwargs) or source
        if func is not torch.Tensor.to:
            moved = tensor if target == source else tensor.detach().clone()
        else:
            physical = [a.dtype if isinstance(a, torch.Tensor) else a for a in rest]
            physical = [_CPU if _is_device(a) else a for a in physical]
            moved = torch.Tensor.to(
                tensor, *physical, **{k: (_CPU if k == "device" else v) for k, v in kwargs.items()}
            )
            if target != source and _key(moved) is _key(tensor):
                moved = moved.clone()  # a move between devices copies
        if moved is not tensor:
            self._label(moved, target)
        return moved

    def _target(self, func: Any, rest: list[Any], kwargs: dict[str, Any]) -> torch.device | None:
        if func is torch.Tensor.cpu:
            return _CPU
        if func is torch.Tensor.cuda:
            raise RuntimeError("Torch not compiled with CUDA enabled")
        if "device" in kwargs and kwargs["device"] is not None:
            return torch.device(kwargs["device"])
        for arg in rest:
            if _is_device(arg):
                return torch.device(arg)
            if isinstance(arg, torch.Tensor):
                return self.device_of(arg)
        return None

    def _create(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        device = kwargs.get("device")
        given = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if device is None and given is not None:  # ``*_like``, ``as_tensor(t)``: t's device
            target = self.device_of(given)
        else:
            target = torch.device(device) if device is not None else _CPU
        if device is not None:
            kwargs = {**kwargs, "device": _CPU}
        out = func(*args, **kwargs)
        self._label(out, target)
        return out

    def _indexing_device(self, args: tuple[Any, ...]) -> torch.device:
        """``t[index]`` and ``t[index] = value``: index tensors on the CPU or on ``t``'s device,
        a value on ``t``'s device (or a CPU scalar), as CUDA's indexing takes them."""
        device = self.device_of(args[0])
        for index in _tensors(args[1]):
            if self.device_of(index) not in (device, _CPU):
                raise RuntimeError(
                    f"indices should be either on cpu or on the same device as the indexed "
                    f"tensor ({device}), not {self.device_of(index)}"
                )
        if len(args) > 2:
            for value in _tensors(args[2]):
                if not _joins_any_device(value, self) and self.device_of(value) != device:
                    raise RuntimeError(
                        f"Expected all tensors to be on the same device, but found at least "
                        f"two devices, {device} and {self.device_of(value)}! (__setitem__)"
                    )
        return device

    def _common_device(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> torch.device | None:
        joined = [t for t in _tensors((args, kwargs)) if not _joins_any_device(t, self)]
        devices = {self.device_of(t) for t in joined}
        if len(devices) > 1:
            first, second = sorted(devices, key=str)[:2]
            seen = ", ".join(f"{tuple(t.shape)} on {self.device_of(t)}" for t in joined)
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two "
                f"devices, {first} and {second}! ({getattr(func, '__name__', func)}: {seen})"
            )
        return next(iter(devices), None)


def _joins_any_device(tensor: torch.Tensor, mode: VirtualDevices) -> bool:
    """CUDA lets a 0-dim CPU tensor (a scalar) join any device's operation; an empty tensor
    has no storage to carry a label, so it joins any too."""
    return tensor.numel() == 0 or (tensor.dim() == 0 and mode.device_of(tensor).type == "cpu")


def _is_device(value: Any) -> bool:
    return isinstance(value, torch.device) or (
        isinstance(value, str) and value.split(":")[0] in {"cpu", "cuda", VIRTUAL_TYPE}
    )


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return (leaf for leaf in leaves if isinstance(leaf, torch.Tensor))
