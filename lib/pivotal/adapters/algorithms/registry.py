"""The algorithms Pivotal knows, by name, and the detection of a file module's algorithm.

Built-ins register themselves when :mod:`pivotal.adapters.algorithms` is imported (its
``BUILTIN`` tuple); another algorithm — a test's, a plug-in's — calls :func:`register_algorithm`
with its class, and :func:`unregister_algorithm` to take it out again.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from pivotal.adapters.algorithms.base import Algorithm, ModuleLayout
from pivotal.adapters.kohya_keys import ALPHA, DORA_SCALE, has_part_prefix, split_key
from pivotal.errors import LoraTargetError

_REGISTRY: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Add ``cls`` (usable as a class decorator). A name or a tensor name another algorithm
    already has is refused: detection must stay unambiguous."""
    if not cls.name or not cls.tensor_names:
        raise LoraTargetError(f"{cls.__name__}: an algorithm needs a name and tensor_names")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls:
        raise LoraTargetError(f"algorithm name {cls.name!r} is taken by {other.__name__}")
    for name, known in _REGISTRY.items():
        shared = set(known.tensor_names) & set(cls.tensor_names)
        if known is not cls and shared:
            raise LoraTargetError(f"{cls.__name__}: tensor name(s) {', '.join(sorted(shared))} belong to {name}")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_algorithm(name: str) -> None:
    _REGISTRY.pop(name, None)


def algorithm_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def algorithm_class(name: str) -> type[Algorithm]:
    """The class registered as ``name``; LoraTargetError listing the known names."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise LoraTargetError(f"unknown LoRA algorithm {name!r} (known: {', '.join(_REGISTRY)})")
    return cls


def is_tensor_name(name: str) -> bool:
    """Whether some algorithm writes a tensor called ``name`` (``alpha`` and ``dora_scale`` too)."""
    return name in (ALPHA, DORA_SCALE) or any(name in c.tensor_names for c in _REGISTRY.values())


def is_adapter_key(key: str) -> bool:
    """Whether ``key`` is a kohya adapter tensor key: a part prefix, a module name and a tensor
    name some algorithm writes (``lora_unet_x.hada_w1_a``, ``lora_te_y.alpha``…)."""
    module, tensor = split_key(key)
    return has_part_prefix(module) and is_tensor_name(tensor)


def detect_algorithm(names: Iterable[str]) -> type[Algorithm]:
    """The algorithm of a module with these tensor names; ValueError (a sentence) when none or
    several claim it."""
    names = set(names)
    found = [c for c in _REGISTRY.values() if c.detect(names)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"no known LoRA algorithm has the tensors {', '.join(sorted(names))} "
                         f"(known: {', '.join(_REGISTRY)})")
    raise ValueError(f"tensors {', '.join(sorted(names))} mix the algorithms "
                     f"{', '.join(sorted(c.name for c in found))}")


def describe_module(tensors: Mapping[str, torch.Tensor]) -> ModuleLayout:
    """Detect a file module's algorithm and read its layout (ValueError when it is broken)."""
    cls = detect_algorithm(tensors)
    unknown = set(tensors) - set(cls.tensor_names) - {ALPHA, DORA_SCALE}
    if unknown:
        raise ValueError(f"tensor(s) {', '.join(sorted(unknown))} do not belong to a {cls.name} module")
    return cls.layout(tensors)
