"""The pieces of a Forge training session, each with its own undo.

:func:`training_session` stacks them on an ``ExitStack``, so whatever was changed is put back in
reverse order however the block ends:

* Forge's LoRA state: ``sd_model.forge_objects`` (and its fields), ``forge_objects_after_applying_lora``
  and ``current_lora_hash`` as they were, and memory management's list of loaded patchers: the
  patchers loaded before are loaded again (a LoRA the last generation merged is merged again, the
  same bytes), those loaded only for the run are unloaded, the order is restored;
* the LoRA of the last generation un-merged for the run: the original (LoRA-free) patchers are
  loaded, which restores Forge's weight backups;
* ``requires_grad`` off on every weight (Forge's loader leaves it on; an inference tensor's flag
  can only be set back inside ``torch.inference_mode``, which is where it is restored);
* on layers that cast their weight per call, forwards that fetch it again in backward instead of
  keeping the copy (:func:`recast_forwards`);
* the blocks' own checkpointing flags off (Forge's ``checkpoint`` raises when one is on), and
  optionally our non-reentrant checkpointing per block, recomputing inside
  :class:`~pivotal.hosts.forge.frozen_weights.InferenceWeightsMode`;
* every engine's embedding database, clip skip and emphasis restored exactly; the cond cache cleared.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from pivotal.errors import ModelLayoutError
from pivotal.hosts.a1111.session import block_checkpointing, builtin_checkpointing_off, clear_cond_cache
from pivotal.hosts.forge.frozen_weights import InferenceWeightsMode, RecastConv2d, RecastLinear, linear_rows
from pivotal.hosts.module_state import restore_instance_forwards, set_instance_forward

#: the ForgeObjects fields a generation swaps (LoRA clones vs originals)
FORGE_OBJECT_FIELDS = ("unet", "clip", "vae", "clipvision")
#: what Forge's LoRA memo is set to when a file in it was rewritten (never equal to a real memo)
FORGOTTEN_LORA_HASH = "pivotal: a merged LoRA file was rewritten"
_ABSENT = object()


# -- encoding through an engine ---------------------------------------------------------------------
def encode_with_engine(engine: Any, texts: list[str]) -> Any:
    """What ``engine(texts)`` returns — (B, 77·k, D), plus the pooled output for an engine that
    returns one — computed as Forge's ``ClassicTextProcessingEngine.__call__`` does, minus its
    console line per embedding and its infotext record (training is not a generation)."""
    batch_chunks, _count = engine.process_texts(texts)
    chunk_count = max(len(chunks) for chunks in batch_chunks)
    zs = []
    for i in range(chunk_count):
        batch_chunk = [chunks[i] if i < len(chunks) else engine.empty_chunk() for chunks in batch_chunks]
        engine.embeddings.fixes = [chunk.fixes for chunk in batch_chunk]
        zs.append(engine.process_tokens([c.tokens for c in batch_chunk], [c.multipliers for c in batch_chunk]))
    if getattr(engine, "return_pooled", False):
        return torch.hstack(zs), zs[0].pooled
    return torch.hstack(zs)


@contextlib.contextmanager
def engine_settings(host: Any) -> Iterator[None]:
    """The engines of ``host`` (the :class:`~pivotal.hosts.forge.host.ForgeHost`) read clip skip
    and emphasis as a generation sets them (``set_clip_skip`` from the option, a fresh emphasis
    object); both are put back afterwards."""
    opts = host.webui.shared.opts
    saved = [(engine, engine.clip_skip, engine.emphasis) for engine in host.engines.values()]
    for engine, _, _ in saved:
        # Forge's encode casts the token and position embeddings to fp32 first, inside its
        # inference mode; done here the same way, so the call below finds nothing to convert
        # (converted outside inference mode they would stop being Forge's inference tensors)
        embeddings = engine.text_encoder.transformer.text_model.embeddings
        with torch.inference_mode():
            embeddings.position_embedding = embeddings.position_embedding.to(dtype=torch.float32)
            embeddings.token_embedding = embeddings.token_embedding.to(dtype=torch.float32)
    try:
        host.sd_model.set_clip_skip(int(getattr(opts, "CLIP_stop_at_last_layers", 1) or 1))
        emphasis = host.webui.emphasis
        for engine, _, _ in saved:
            engine.emphasis = emphasis.get_current_option(getattr(opts, "emphasis", "Original"))()
        yield
    finally:
        for engine, skip, emph in saved:
            engine.clip_skip, engine.emphasis = skip, emph


# -- the embedding databases -------------------------------------------------------------------------
@dataclass
class DatabaseSnapshot:
    """One engine database's dicts (list contents included) and its per-call ``fixes``."""

    db: Any
    word_embeddings: dict[str, Any]
    ids_lookup: list[tuple[Any, list[Any], list[Any]]]
    skipped: dict[str, Any]
    fixes: Any

    @classmethod
    def take(cls, db: Any) -> "DatabaseSnapshot":
        return cls(db, dict(db.word_embeddings), [(k, v, list(v)) for k, v in db.ids_lookup.items()],
                   dict(db.skipped_embeddings), db.fixes)

    def restore(self) -> None:
        """The recorded state, in the same dict and list objects."""
        db = self.db
        db.word_embeddings.clear()
        db.word_embeddings.update(self.word_embeddings)
        db.ids_lookup.clear()
        for key, lst, content in self.ids_lookup:
            lst[:] = content
            db.ids_lookup[key] = lst
        db.skipped_embeddings.clear()
        db.skipped_embeddings.update(self.skipped)
        db.fixes = self.fixes


@contextlib.contextmanager
def restored_databases(databases: Iterable[Any]) -> Iterator[None]:
    snaps = [DatabaseSnapshot.take(db) for db in databases]
    try:
        yield
    finally:
        for snap in snaps:
            snap.restore()


# -- Forge's LoRA state and memory management ----------------------------------------------------------
def merged_weight_count(sd_model: Any) -> int:
    """Weights a LoRA is merged into now (Forge's backups) plus layers with an on-the-fly LoRA."""
    originals = sd_model.forge_objects_original
    count = 0
    for model in (originals.unet.model, originals.clip.patcher.model):
        loader = getattr(model, "lora_loader", None)
        if loader is not None:
            count += len(loader.backup) + len(loader.online_backup)
    return count


@contextlib.contextmanager
def restored_forge_state(webui: Any, sd_model: Any) -> Iterator[None]:
    """``forge_objects`` (and fields), ``forge_objects_after_applying_lora``, ``current_lora_hash``
    and the loaded patchers (which, in which order) as on entry, again on exit."""
    attrs = {a: getattr(sd_model, a, _ABSENT) for a in ("forge_objects", "forge_objects_after_applying_lora",
                                                           "current_lora_hash")}
    fields = [(obj, {f: getattr(obj, f, None) for f in FORGE_OBJECT_FIELDS})
              for obj in (attrs["forge_objects"], attrs["forge_objects_after_applying_lora"]) if obj is not _ABSENT]
    management = webui.memory_management
    before = [entry.model for entry in management.current_loaded_models]
    try:
        yield
    finally:
        for name, value in attrs.items():
            if value is not _ABSENT:
                setattr(sd_model, name, value)
        for obj, values in fields:
            for name, value in values.items():
                setattr(obj, name, value)
        restore_loaded(management, before)


def restore_loaded(management: Any, before: list[Any]) -> None:
    """Memory management's loaded patchers back to ``before`` (by identity, in order)."""
    def index(model: Any) -> int:
        return next((i for i, m in enumerate(before) if m is model), len(before))

    loaded = management.current_loaded_models
    missing = [m for m in before if not any(entry.model is m for entry in loaded)]
    if missing:
        # loading a LoRA clone again unloads the original and merges the LoRA as before
        management.load_models_gpu(missing)
    for entry in [e for e in loaded if index(e.model) == len(before)]:
        loaded.remove(entry)
        entry.model_unload()
    loaded.sort(key=lambda entry: index(entry.model))


def unmerge_loras(webui: Any, sd_model: Any) -> int:
    """Load the original (LoRA-free) UNet and text-encoder patchers, which restores the weights
    any LoRA was merged into; returns how many were merged."""
    merged = merged_weight_count(sd_model)
    originals = sd_model.forge_objects_original
    webui.memory_management.load_models_gpu([originals.unet, originals.clip.patcher])
    left = merged_weight_count(sd_model)
    if left:
        raise ModelLayoutError(f"{left} weights still carry a LoRA after loading Forge's original patchers; "
                               "generate once without a <lora:…> tag and start again")
    return merged


def forget_lora_file(sd_model: Any, path: str) -> None:
    """Forge skips re-applying LoRAs while its memo (``current_lora_hash``: file names and weights)
    is unchanged; when ``path`` is in the memo its merged weights are stale: reset it."""
    memo = str(getattr(sd_model, "current_lora_hash", ""))
    if os.path.basename(path) in memo:
        sd_model.current_lora_hash = FORGOTTEN_LORA_HASH


# -- parameters and checkpointing ----------------------------------------------------------------------
@contextlib.contextmanager
def frozen_parameters(roots: Iterable[nn.Module]) -> Iterator[int]:
    """``requires_grad`` off on every parameter under ``roots``; yields how many were on. On exit
    each flag is put back, an inference tensor's inside ``torch.inference_mode`` (the only place
    it may be set on)."""
    saved: list[tuple[nn.Parameter, bool]] = []
    seen: set[int] = set()
    for root in roots:
        for p in root.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                saved.append((p, p.requires_grad))
                p.requires_grad_(False)
    try:
        yield sum(1 for _, flag in saved if flag)
    finally:
        for p, flag in saved:
            if p.requires_grad != flag:
                if p.is_inference():
                    with torch.inference_mode():
                        p.requires_grad_(flag)
                else:
                    p.requires_grad_(flag)


def _checkpointed(inner: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with InferenceWeightsMode():  # the recomputation in backward runs outside the forward's mode
            return inner(*args, **kwargs)

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
    return forward


def _forge_fetch(operations: Any) -> Callable[[Any, torch.Tensor], tuple[Any, Any, Any]]:
    """Forge's own per-call weight (cast, moved, with any on-the-fly LoRA) for an input like ``like``."""
    def fetch(layer: Any, like: torch.Tensor) -> tuple[Any, Any, Any]:
        weight, bias, signal = operations.weights_manual_cast(layer, like)
        return weight, bias, operations.main_stream_worker(weight, bias, signal)
    return fetch


@contextlib.contextmanager
def recast_forwards(roots: Iterable[nn.Module], operations: Any) -> Iterator[int]:
    """On Forge's Linear / Conv2d layers, an instance ``forward`` that, while the layer casts its
    weight per call ("manual cast": float8 or fp16 storage, CPU swap) and a gradient is wanted,
    fetches the weight again in backward instead of keeping the cast copy (see
    :class:`~pivotal.hosts.forge.frozen_weights.RecastLinear`); otherwise Forge's own forward.
    Removed again on exit; yields how many layers got one."""
    kinds: dict[Any, Callable[..., torch.Tensor]] = {
        getattr(operations.ForgeOperations, "Linear", None): lambda x, *a: linear_rows(RecastLinear, x, *a),
        getattr(operations.ForgeOperations, "Conv2d", None): RecastConv2d.apply}
    fetch = _forge_fetch(operations)
    saved: list[tuple[nn.Module, Any]] = []

    def make(layer: nn.Module, function: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        own = type(layer).forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            if (getattr(layer, "parameters_manual_cast", False) and torch.is_grad_enabled() and x.requires_grad
                    and getattr(layer, "padding_mode", "zeros") == "zeros"):
                return function(x, layer, fetch)
            return own(layer, x)
        return forward

    try:
        seen: set[int] = set()
        for root in roots:
            for m in root.modules():
                function = kinds.get(type(m))
                if function is None or id(m) in seen:
                    continue
                seen.add(id(m))
                set_instance_forward(m, make(m, function), saved)
        yield len(saved)
    finally:
        restore_instance_forwards(saved)


# -- the whole session ---------------------------------------------------------------------------------
@contextlib.contextmanager
def training_session(host: Any, gradient_checkpointing: bool) -> Iterator[dict[str, Any]]:
    """Put Forge's loaded model in training shape; everything is restored on exit (see the module
    docstring). Yields ``{"loras_unloaded", "recast_layers", "checkpointed"}``."""
    webui, sd_model = host.webui, host.sd_model
    if webui.sd_model is not sd_model or webui.model_pending():
        raise ModelLayoutError("another checkpoint was selected in Forge after this run was set up; "
                               "start the run again")
    info: dict[str, Any] = {}
    originals = sd_model.forge_objects_original
    with contextlib.ExitStack() as stack:
        stack.callback(clear_cond_cache, webui)
        stack.enter_context(restored_forge_state(webui, sd_model))
        info["loras_unloaded"] = unmerge_loras(webui, sd_model)
        stack.enter_context(restored_databases(e.embeddings for e in host.engines.values()))
        stack.enter_context(frozen_parameters([originals.unet.model, originals.clip.cond_stage_model,
                                               originals.vae.first_stage_model]))
        info["recast_layers"] = stack.enter_context(recast_forwards(
            [originals.unet.model, originals.clip.cond_stage_model], webui.operations))
        stack.enter_context(builtin_checkpointing_off(host.unet))
        checkpointing = block_checkpointing(host.unet, _checkpointed) if gradient_checkpointing else None
        info["checkpointed"] = stack.enter_context(checkpointing) if checkpointing is not None else 0
        clear_cond_cache(webui)
        yield info
