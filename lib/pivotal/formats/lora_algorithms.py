"""Which algorithm a LoRA-file module uses, told from its weight names (LyCORIS ``weight_list`` rules).

Every trainer writes one module as ``<module name>.<weight name>``; the set of weight names says
the algorithm (kohya LoRA ``lora_down.weight``/``lora_up.weight``, LyCORIS LoHa ``hada_w1_a``…,
LoKr ``lokr_w1``…, DoRA = LoRA + ``dora_scale``, LoCon with Tucker = LoRA + ``lora_mid.weight``,
peft's DoRA ``lora_magnitude_vector``…). Detection asks each :class:`Algorithm` in turn, most
specific first, so a DoRA module is never taken for a plain LoRA.

Supported algorithms (``supported=True``) are the ones :mod:`pivotal.adapters.algorithms` applies
(LoRA/LoCon with or without Tucker, LoHa, LoKr, DoRA on any of them): their modules are kept in
``Bundle.lora`` under kohya names and checked there by the algorithm's own layout rules
(:func:`pivotal.adapters.algorithms.describe_module`). The rest are refused naming them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from pivotal.adapters.algorithms import registry as _registry
from pivotal.errors import BundleError


@dataclass(frozen=True)
class Algorithm:
    """One on-disk LoRA algorithm: its name, the weight names that mark it, all weight names it may
    have, and whether Pivotal applies it."""

    name: str
    markers: tuple[str, ...]
    weights: tuple[str, ...]
    supported: bool = False

    def matches(self, weights: set[str]) -> bool:
        return any(m in weights for m in self.markers)

    def label(self) -> str:
        """``"LoHa (hada_w1_a …)"``: the name and the key that told it."""
        return f"{self.name} ({self.markers[0]}{' …' if len(self.weights) > 1 else ''})"


_LORA = ("lora_down.weight", "lora_up.weight", "alpha")
_PEFT = ("lora_A.weight", "lora_B.weight", "alpha")
#: Most specific first: the first whose marker a module has is its algorithm.
ALGORITHMS: tuple[Algorithm, ...] = (
    Algorithm("DoRA", ("dora_scale",), _LORA + ("dora_scale", "lora_mid.weight"), supported=True),
    Algorithm("DoRA (peft)", ("lora_magnitude_vector",), _PEFT + ("lora_magnitude_vector",)),
    Algorithm("LoCon with Tucker", ("lora_mid.weight",), _LORA + ("lora_mid.weight",), supported=True),
    Algorithm("LoHa", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
              ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"), supported=True),
    Algorithm("LoKr", ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"),
              ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"),
              supported=True),
    Algorithm("(IA)^3", ("on_input",), ("weight", "on_input")),
    Algorithm("GLoRA", ("a1.weight", "a2.weight", "b1.weight", "b2.weight"),
              ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha")),
    Algorithm("OFT/BOFT", ("oft_blocks", "oft_diag", "oft_R"), ("oft_blocks", "oft_diag", "oft_R", "rescale", "alpha")),
    Algorithm("full weight difference", ("diff", "diff_b"), ("diff", "diff_b")),
    Algorithm("norm", ("w_norm", "b_norm"), ("w_norm", "b_norm")),
    Algorithm("LoRA with scalar", ("scalar",), _LORA + ("scalar",)),
    Algorithm("LoRA", ("lora_down.weight", "lora_up.weight", "alpha"), _LORA, supported=True),
    Algorithm("LoRA (peft)", ("lora_A.weight", "lora_B.weight"), _PEFT, supported=True),
)
#: Every weight name some built-in algorithm has: the suffixes that make a key a LoRA-module key.
WEIGHT_NAMES: frozenset[str] = frozenset(w for a in ALGORITHMS for w in a.weights)


def _plugins() -> list[Algorithm]:
    """Algorithms registered with :mod:`pivotal.adapters.algorithms` beyond the built-in table
    (a plug-in's, a test's): read and applied like the built-ins, under their own tensor names."""
    found = []
    for name in _registry.algorithm_names():
        cls = _registry.algorithm_class(name)
        names = tuple(cls.tensor_names)
        if not set(names) <= WEIGHT_NAMES:
            found.append(Algorithm(name, names, names + ("alpha",), supported=True))
    return found


def weight_names() -> frozenset[str]:
    """:data:`WEIGHT_NAMES` plus the tensor names of registered plug-in algorithms."""
    extra = [w for a in _plugins() for w in a.weights]
    return WEIGHT_NAMES | frozenset(extra) if extra else WEIGHT_NAMES


def algorithm_of(weights: Iterable[str]) -> Algorithm | None:
    """The algorithm of a module with these weight names (None when no algorithm claims them)."""
    names = set(weights)
    for algo in (*ALGORITHMS, *_plugins()):
        if algo.matches(names):
            return algo
    return None


def split_module_key(key: str) -> tuple[str, str] | None:
    """(module name, weight name) of a LoRA-module key, or None when it ends in no known weight name.

    Weight names can hold dots (``lora_down.weight``), module names can too (peft's
    ``unet.down_blocks.0…``): the longest known weight name that ends the key wins.
    """
    best: tuple[str, str] | None = None
    for w in weight_names():
        if key.endswith("." + w) and len(key) > len(w) + 1 and (best is None or len(w) > len(best[1])):
            best = (key[: -len(w) - 1], w)
    return best


def refuse_unsupported(path: str, modules: Mapping[str, Algorithm]) -> None:
    """BundleError naming every unsupported algorithm in the file (with a count and an example module)."""
    bad: dict[str, list[str]] = {}
    for module, algo in modules.items():
        if not algo.supported:
            bad.setdefault(algo.label(), []).append(module)
    if not bad:
        return
    parts = [f"{label} in {len(mods)} module(s), e.g. {sorted(mods)[0]}" for label, mods in sorted(bad.items())]
    raise BundleError(path, f"{'; '.join(parts)}: not supported yet. Pivotal applies LoRA, LoCon, LoHa, LoKr and "
                            "DoRA, and refuses rather than apply this file wrongly; the webui's own Lora loader "
                            "may load it")
