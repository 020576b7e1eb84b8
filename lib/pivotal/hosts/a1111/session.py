"""The pieces of an A1111 training session, each with its own undo.

:func:`training_session` (used by :class:`pivotal.hosts.a1111.host.A1111Host`) stacks them on an
``ExitStack`` as it goes, so whatever was changed is put back in reverse order however the block
ends, including when a later setup step fails:

* the built-in Lora extension's merged weights are restored (``load_networks([])``), so no LoRA from
  the last generation sits in the weights or is re-merged in place mid-backward;
* ``requires_grad`` off on every host parameter (the webui leaves the UNet's on), train/eval flags
  kept as they are, devices recorded;
* attention optimizations without a trustworthy backward swapped for ``sdp`` (or plain attention);
* the UNet's own checkpointing flags off (sgm's CheckpointFunction gives no gradient to tensors
  that are not a block's registered parameters, i.e. our LoRA), optionally our own non-reentrant
  checkpointing per block;
* the embedding database and the hijack's per-generation fields restored exactly, the cond cache
  cleared (its key does not include embedding vectors or LoRA contents).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from pivotal.hosts.a1111.webui import Webui, optional_module
from pivotal.hosts.module_state import capture, restore_instance_forwards, set_instance_forward

#: attention optimizations whose backward we trust (torch's scaled_dot_product_attention)
BACKWARD_SAFE_OPTIMIZATIONS = ("sdp", "sdp-no-mem")
#: what we switch to when the current one is not in the list above ("None" = plain attention)
PREFERRED_OPTIMIZATIONS = ("sdp", "None")
#: block classes (by name; ldm and sgm have their own) that we checkpoint, and their inner forward
CHECKPOINT_BLOCKS = ("ResBlock", "BasicTransformerBlock")
#: the UNet's own checkpointing switches (ldm/sgm use both names)
CHECKPOINT_FLAGS = ("checkpoint", "use_checkpoint")
_ABSENT = object()


# -- the embedding database ------------------------------------------------------------------------
@dataclass
class EmbeddingDbSnapshot:
    """Everything registering an embedding or running the text encoder can change on the webui:
    the database's three dicts (list contents included) and the hijack's per-generation fields."""

    word_embeddings: dict[str, Any]
    ids_lookup: list[tuple[Any, list[Any], list[Any]]]
    skipped: dict[str, Any]
    expected_shape: Any
    fixes: Any
    comments: list[Any] = field(default_factory=list)
    extra_params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def take(cls, webui: Webui) -> "EmbeddingDbSnapshot":
        db, hijack = webui.embedding_db, webui.sd_hijack.model_hijack
        return cls(word_embeddings=dict(db.word_embeddings),
                   ids_lookup=[(k, v, list(v)) for k, v in db.ids_lookup.items()],
                   skipped=dict(db.skipped_embeddings), expected_shape=db.expected_shape,
                   fixes=hijack.fixes, comments=list(hijack.comments),
                   extra_params=dict(hijack.extra_generation_params))

    def restore(self, webui: Webui) -> None:
        """Put the recorded state back in place (the same dict and list objects, so whoever holds a
        reference to them, e.g. the TI cards page, sees the restored content)."""
        db, hijack = webui.embedding_db, webui.sd_hijack.model_hijack
        db.word_embeddings.clear()
        db.word_embeddings.update(self.word_embeddings)
        db.ids_lookup.clear()
        for key, lst, content in self.ids_lookup:
            lst[:] = content
            db.ids_lookup[key] = lst
        db.skipped_embeddings.clear()
        db.skipped_embeddings.update(self.skipped)
        db.expected_shape = self.expected_shape
        hijack.fixes = self.fixes
        hijack.comments[:] = self.comments
        hijack.extra_generation_params.clear()
        hijack.extra_generation_params.update(self.extra_params)


@contextlib.contextmanager
def restored_embedding_db(webui: Webui) -> Iterator[EmbeddingDbSnapshot]:
    """The database and hijack fields as they were on entry, again on exit."""
    snap = EmbeddingDbSnapshot.take(webui)
    try:
        yield snap
    finally:
        snap.restore(webui)


# -- the built-in Lora extension -------------------------------------------------------------------
def unload_merged_loras(webui: Webui, sd_model: nn.Module) -> int:
    """Unload the networks of the last generation and put the original weights back now (the
    extension would otherwise do it lazily, inside our first forward). Returns the number of
    layers restored. No-op without the Lora extension or in its functional (unmerged) mode.

    reForge: its loader only swaps the original patchers back into ``sd_model.forge_objects``; the
    LoRA stays merged in the shared weights (as inference tensors, which backward refuses) until
    its model management loads the originals, which restores the backups: that is done here."""
    networks = webui.networks
    if networks is None:
        return 0
    # explicit empty multiplier lists: reForge's loader zips them without a None default
    networks.load_networks([], [], [], None)
    forge_objects = getattr(sd_model, "forge_objects", None)
    if forge_objects is not None:
        return _unpatch_forge_objects(forge_objects)
    restored = 0
    with torch.no_grad():
        for m in sd_model.modules():
            if getattr(m, "network_layer_name", None) is None:
                continue
            if getattr(m, "network_current_names", ()) != ():
                # with no network loaded this restores the backup and records "nothing merged"
                networks.network_apply_weights(m)
                restored += 1
    return restored


def _unpatch_forge_objects(forge_objects: Any) -> int:
    """reForge: load the original UNet and text-encoder patchers, which unpatches any clone that
    had a LoRA merged; returns the number of weights that were merged before."""
    management = optional_module("ldm_patched.modules.model_management")
    if management is None:
        return 0
    merged = sum(len(getattr(loaded.model, "backup", {}) or {}) for loaded in management.current_loaded_models)
    clip = getattr(forge_objects, "clip", None)
    patchers = [forge_objects.unet] + ([clip.patcher] if clip is not None else [])
    management.load_models_gpu(patchers)
    return merged


# -- attention -----------------------------------------------------------------------------------
@contextlib.contextmanager
def backward_safe_attention(webui: Webui) -> Iterator[str]:
    """Switch to an attention optimization with a working backward for the block; yields the
    name in use ("" = plain attention). The previous one is re-applied on exit."""
    hijack_mod = webui.sd_hijack
    previous = getattr(hijack_mod, "current_optimizer", None)
    previous_method = getattr(hijack_mod.model_hijack, "optimization_method", None)
    if previous is not None and previous.name in BACKWARD_SAFE_OPTIMIZATIONS:
        yield previous.name
        return
    available = {o.name: o for o in getattr(hijack_mod, "optimizers", [])}
    choice = next((n for n in PREFERRED_OPTIMIZATIONS if n == "None" or n in available), "None")
    try:
        hijack_mod.model_hijack.apply_optimizations(available[choice].title() if choice in available else "None")
        yield "" if choice == "None" else choice
    finally:
        hijack_mod.model_hijack.apply_optimizations(previous.title() if previous is not None else "None")
        hijack_mod.model_hijack.optimization_method = previous_method


# -- checkpointing ---------------------------------------------------------------------------------
@contextlib.contextmanager
def builtin_checkpointing_off(unet: nn.Module) -> Iterator[int]:
    """Set the UNet blocks' own ``checkpoint``/``use_checkpoint`` flags False (restored on exit)."""
    saved: list[tuple[nn.Module, str, Any]] = []
    try:
        for m in unet.modules():
            for flag in CHECKPOINT_FLAGS:
                value = m.__dict__.get(flag, _ABSENT)
                if isinstance(value, bool) and value:
                    saved.append((m, flag, value))
                    object.__setattr__(m, flag, False)
        yield len(saved)
    finally:
        for m, flag, value in reversed(saved):
            object.__setattr__(m, flag, value)


def _checkpointed(inner: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        # non-reentrant: gradients reach tensors outside the inputs (LoRA) even when no input needs grad
        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)
    return forward


@contextlib.contextmanager
def block_checkpointing(unet: nn.Module,
                        wrap: Callable[[Callable[..., Any]], Callable[..., Any]] = _checkpointed) -> Iterator[int]:
    """Checkpoint every ResBlock / BasicTransformerBlock of an ldm or sgm UNet through an
    instance-level ``forward`` (the class stays untouched; removed again on exit). ``wrap`` turns a
    block's ``_forward`` into its checkpointed forward (Forge's recomputes under its weights mode)."""
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for m in unet.modules():
            inner = getattr(m, "_forward", None)
            if type(m).__name__ in CHECKPOINT_BLOCKS and callable(inner):
                set_instance_forward(m, wrap(inner), saved)
        yield len(saved)
    finally:
        restore_instance_forwards(saved)


# -- devices, caches, fingerprints -------------------------------------------------------------------
@contextlib.contextmanager
def devices_kept(parts: dict[str, nn.Module]) -> Iterator[None]:
    """Move each part back to the device its first parameter was on, should anything move it."""
    where = {name: next(m.parameters()).device for name, m in parts.items() if any(True for _ in m.parameters())}
    try:
        yield
    finally:
        for name, device in where.items():
            if next(parts[name].parameters()).device != device:
                parts[name].to(device)


def clear_cond_cache(webui: Webui) -> None:
    """Forget the webui's cached conditioning (its key holds prompts, not embedding vectors).

    The lists are emptied in place: a processing object already made holds the class's list
    itself, and must see the cleared cache too."""
    proc = webui.processing
    for cls_name in ("StableDiffusionProcessing", "StableDiffusionProcessingTxt2Img"):
        cls = getattr(proc, cls_name, None)
        for attr in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
            cache = vars(cls).get(attr) if cls is not None else None
            if isinstance(cache, list):
                cache[:] = [None] * len(cache)


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over every parameter's and buffer's name, dtype, shape and bytes (16 hex digits).
    Seconds on a full-size model: for checks and tests, not for every step."""
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        data = t.detach().to("cpu").contiguous().reshape(-1)  # 1-D: a 0-dim tensor cannot be viewed as bytes
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()[:16]


def module_flags(module: nn.Module) -> tuple[int, int, int]:
    """(parameters with requires_grad, modules in training mode, instance-level forwards) — a cheap
    summary that shows whether a session left anything behind."""
    grads = sum(1 for p in module.parameters() if p.requires_grad)
    training = sum(1 for m in module.modules() if m.training)
    forwards = sum(1 for m in module.modules() if "forward" in m.__dict__)
    return grads, training, forwards


# -- the whole session ---------------------------------------------------------------------------------
@contextlib.contextmanager
def training_session(webui: Webui, sd_model: nn.Module, unet: nn.Module, gradient_checkpointing: bool,
                     parts: dict[str, nn.Module]) -> Iterator[dict[str, Any]]:
    """Put the loaded webui model in training shape; everything is restored on exit (see the
    module docstring). Yields what was done: ``{"loras_unloaded", "attention", "checkpointed"}``."""
    info: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(clear_cond_cache, webui)
        # first: unloading also unregisters the last generation's bundle embeddings, and the
        # database restored at the end must be the one that matches "no network loaded"
        info["loras_unloaded"] = unload_merged_loras(webui, sd_model)
        stack.enter_context(restored_embedding_db(webui))
        snapshot = capture([sd_model])
        stack.callback(snapshot.restore)
        stack.enter_context(devices_kept(parts))
        sd_model.requires_grad_(False)
        info["attention"] = stack.enter_context(backward_safe_attention(webui))
        stack.enter_context(builtin_checkpointing_off(unet))
        info["checkpointed"] = stack.enter_context(block_checkpointing(unet)) if gradient_checkpointing else 0
        clear_cond_cache(webui)
        yield info
