"""Record and restore the trainable state of a host's modules, and switch on checkpointing.

A training session changes three things on a model it does not own: ``requires_grad`` of every
parameter, ``training`` of every module and the gradient-checkpointing flags. diffusers and
transformers keep the latter as instance attributes ``gradient_checkpointing`` and
``_gradient_checkpointing_func`` (sometimes only as class attributes), so a snapshot remembers,
per module, whether each attribute was on the instance and with which value, and restoring puts
back exactly that: values reassigned, attributes that were not on the instance deleted again.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.utils.checkpoint
from torch import nn

#: The instance attributes diffusers / transformers use for gradient checkpointing.
CHECKPOINT_ATTRS = ("gradient_checkpointing", "_gradient_checkpointing_func")
_ABSENT = object()


def set_instance_forward(m: nn.Module, forward: Any, saved: list[tuple[nn.Module, Any]]) -> None:
    """Give ``m`` an instance-level ``forward``, remembering in ``saved`` what the instance had
    (undo with :func:`restore_instance_forwards`; the class stays untouched)."""
    saved.append((m, m.__dict__.get("forward", _ABSENT)))
    m.forward = forward  # type: ignore[method-assign]


def restore_instance_forwards(saved: list[tuple[nn.Module, Any]]) -> None:
    """Undo :func:`set_instance_forward` calls, newest first: a forward the instance had comes back,
    one it did not have is removed."""
    for m, previous in reversed(saved):
        if previous is _ABSENT:
            m.__dict__.pop("forward", None)
        else:
            m.forward = previous  # type: ignore[method-assign]
    saved.clear()


def checkpoint_call(function: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint`` without re-entrance.

    Non-reentrant checkpointing passes gradients to parameters outside the checkpointed inputs
    (our LoRA tensors) even when no input requires grad, which the reentrant variant does not.
    diffusers calls this as ``f(module, *args)``, transformers as ``f(partial(forward), *args)``.
    """
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)


def _unique_modules(roots: Iterable[nn.Module]) -> list[nn.Module]:
    seen: set[int] = set()
    out: list[nn.Module] = []
    for root in roots:
        for m in root.modules():
            if id(m) not in seen:
                seen.add(id(m))
                out.append(m)
    return out


@dataclass
class ModuleStateSnapshot:
    """What :func:`capture` saw: per parameter ``requires_grad``, per module ``training`` and the
    checkpointing instance attributes (``_ABSENT`` when not on the instance)."""

    requires_grad: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    training: list[tuple[nn.Module, bool]] = field(default_factory=list)
    checkpointing: list[tuple[nn.Module, dict[str, Any]]] = field(default_factory=list)

    def restore(self) -> None:
        """Put every recorded flag and attribute back as it was."""
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        for m, flag in self.training:
            # Module.train() would recurse into children; set only this module's own flag.
            m.training = flag
        for m, attrs in self.checkpointing:
            for name, value in attrs.items():
                if value is _ABSENT:
                    if name in m.__dict__:
                        delattr(m, name)
                else:
                    object.__setattr__(m, name, value)


def capture(roots: Iterable[nn.Module]) -> ModuleStateSnapshot:
    """Snapshot the trainable state of every module and parameter under ``roots``."""
    modules = _unique_modules(roots)
    snap = ModuleStateSnapshot()
    seen_params: set[int] = set()
    for m in modules:
        snap.training.append((m, m.training))
        snap.checkpointing.append((m, {a: m.__dict__.get(a, _ABSENT) for a in CHECKPOINT_ATTRS}))
        for p in m.parameters(recurse=False):
            if id(p) not in seen_params:
                seen_params.add(id(p))
                snap.requires_grad.append((p, p.requires_grad))
    return snap


def enable_checkpointing(root: nn.Module) -> int:
    """Turn on gradient checkpointing in every sub-module that supports it; return how many.

    Works on the flags directly instead of ``enable_gradient_checkpointing()`` /
    ``gradient_checkpointing_enable()``: the latter's name and behaviour change between
    transformers versions, and it registers an input-grad hook on the embeddings that a session
    would then have to find and remove again.
    """
    count = 0
    for m in root.modules():
        if hasattr(m, "gradient_checkpointing"):
            object.__setattr__(m, "gradient_checkpointing", True)
            object.__setattr__(m, "_gradient_checkpointing_func", checkpoint_call)
            count += 1
    return count


def uses_checkpoint_func(model: nn.Module) -> bool:
    """Whether ``model``'s layers call ``_gradient_checkpointing_func`` (diffusers, and
    transformers >= 4.35). Older transformers call the reentrant ``torch.utils.checkpoint``
    themselves, which would cut the gradient to a text-encoder LoRA when no input needs grad."""
    setter = getattr(type(model), "_set_gradient_checkpointing", None)
    if setter is None:
        return False
    try:
        params = inspect.signature(setter).parameters
    except (TypeError, ValueError):
        return False
    return "gradient_checkpointing_func" in params

