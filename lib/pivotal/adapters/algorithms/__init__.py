"""LoRA-family algorithms as strategies (the pattern of LyCORIS' ``functional`` → modules).

Each algorithm is one file holding one :class:`~pivotal.adapters.algorithms.base.Algorithm`
subclass: its parameters, its weight delta, its forward contribution and its tensor names. The
layer kinds (:mod:`pivotal.adapters.layer_kinds`) say how a delta reaches a host layer; the
attach/detach wrapper (:mod:`pivotal.adapters.lora_layers`) and the network
(:mod:`pivotal.adapters.network`) know no algorithm by name.

Adding an algorithm: a new file here with a ``@register_algorithm`` class, and its module in
``BUILTIN`` below (a test or plug-in calls ``register_algorithm`` itself instead).
"""

from __future__ import annotations

from pivotal.adapters.algorithms import loha as _loha
from pivotal.adapters.algorithms import lokr as _lokr
from pivotal.adapters.algorithms import lora as _lora
from pivotal.adapters.algorithms.base import FULL_PRECISION, Algorithm, AlgorithmSpec, ModuleLayout
from pivotal.adapters.algorithms.registry import (
    algorithm_class,
    algorithm_names,
    describe_module,
    detect_algorithm,
    is_adapter_key,
    is_tensor_name,
    register_algorithm,
    unregister_algorithm,
)

#: The built-in algorithms, each registered by importing its module.
BUILTIN = (_lora.LoRA, _loha.LoHa, _lokr.LoKr)

__all__ = ["BUILTIN", "FULL_PRECISION", "Algorithm", "AlgorithmSpec", "ModuleLayout", "algorithm_class",
           "algorithm_names", "describe_module", "detect_algorithm", "is_adapter_key", "is_tensor_name",
           "register_algorithm", "unregister_algorithm"]
