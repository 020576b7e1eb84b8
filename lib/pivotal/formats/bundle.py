"""The bundle: one safetensors file holding a kohya-keyed LoRA and ``bundle_emb.*`` embeddings.

Canonical keys written (what the webui's built-in Lora extension, v1.7+, loads):

* LoRA: ``lora_unet_*`` / ``lora_te_*`` (SD1) / ``lora_te1_*`` + ``lora_te2_*`` (SDXL), each module
  with its algorithm's tensors (LoRA: ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``; LoHa,
  LoKr, DoRA: see :mod:`pivotal.adapters.algorithms`);
* SD1 embedding ``<name>``: ``bundle_emb.<name>.string_to_param.*`` (N, 768);
* SDXL embedding ``<name>``: ``bundle_emb.<name>.clip_l`` (N, 768) + ``bundle_emb.<name>.clip_g`` (N, 1280);

and nothing else per embedding. Reading is lenient about other writers' spellings
(``emb_params``, OneTrainer's SD1 ``clip_l``) but strict about safety: names, dtypes, shapes and
finiteness are checked per tensor, and every key nobody claimed is reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pivotal.adapters.algorithms import FULL_PRECISION, describe_module, is_adapter_key
from pivotal.adapters.kohya_keys import BASE_PREFIXES, group_by_module, split_key
from pivotal.errors import BundleError, SaveError
from pivotal.formats.bundle_embeddings import (
    BundleEmbedding,
    check_embeddings,
    embedding_file,
    parse_embeddings,
)
from pivotal.formats.bundle_metadata import TrainingInfo, build_metadata
from pivotal.formats.embedding_keys import EMB_PREFIX
from pivotal.formats.lora_parts import read_lora_modules, to_kohya
from pivotal.formats.safetensors_io import (
    FLOAT_DTYPES,
    Header,
    addnet_hash,
    atomic_save,
    data_hash,
    read_file,
)
from pivotal.text.names import validate_embedding_name

#: Base model -> its text-encoder keys, in the order the UNet context concatenates them (also the
#: embedding vector keys of a bundle).
ENCODER_KEYS: dict[str, tuple[str, ...]] = {"sd1": ("clip_l",), "sdxl": ("clip_l", "clip_g")}


@dataclass
class Bundle:
    """A bundle read from disk (or about to be written)."""

    base_model: str  # "sd1" | "sdxl"
    lora: dict[str, torch.Tensor]
    embeddings: dict[str, BundleEmbedding]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = ""
    unknown_keys: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: the validated header of the file the tensors came from (None before writing)
    header: Header | None = None
    #: part -> the on-disk formats its modules came in ("kohya", "peft/diffusers", ...)
    formats: dict[str, list[str]] = field(default_factory=dict)
    #: part -> the algorithms of its modules ("LoRA", ...; see formats/lora_algorithms.py)
    algorithms: dict[str, list[str]] = field(default_factory=dict)

    def lora_modules(self) -> dict[str, dict[str, torch.Tensor]]:
        """{kohya module name: {tensor name: t}}, e.g. ``{"lora_down.weight": t, "lora_up.weight": t, "alpha": t}``."""
        return group_by_module(self.lora)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def embedding_keys(base_model: str, emb: BundleEmbedding) -> dict[str, torch.Tensor]:
    """The canonical bundle keys of one embedding."""
    want = ENCODER_KEYS[base_model]
    if tuple(sorted(emb.vectors)) != tuple(sorted(want)):
        raise BundleError("<bundle>", f"embedding {emb.name!r} has encoder vectors {sorted(emb.vectors)}; "
                                      f"a {base_model} bundle needs exactly {list(want)}")
    if base_model == "sd1":
        return {f"{EMB_PREFIX}{emb.name}.string_to_param.*": emb.vectors["clip_l"]}
    return {f"{EMB_PREFIX}{emb.name}.{k}": emb.vectors[k] for k in want}


def write_bundle(path: str | os.PathLike, base_model: str, lora: dict[str, torch.Tensor],
                 embeddings: list[BundleEmbedding], info: TrainingInfo,
                 dtype: torch.dtype | None = None) -> Header:
    """Validate everything, then write the bundle atomically. Returns the written file's header.

    ``dtype``: save precision of LoRA weights and embedding vectors (alphas stay fp32).
    """
    if base_model not in ENCODER_KEYS:
        raise SaveError(f"cannot save {path}: unknown base model {base_model!r} (expected sd1 or sdxl)")
    tensors: dict[str, torch.Tensor] = {}
    allowed = BASE_PREFIXES[base_model]
    for k, t in lora.items():
        if not is_adapter_key(k):
            raise SaveError(f"cannot save {path}: {k!r} is not a kohya LoRA key")
        if not k.startswith(allowed):
            raise SaveError(f"cannot save {path}: {k!r} does not belong in a {base_model} LoRA "
                            f"(allowed prefixes: {', '.join(allowed)})")
        tensors[k] = t if (dtype is None or split_key(k)[1] in FULL_PRECISION) else t.to(dtype)
    records = []
    for emb in embeddings:
        validate_embedding_name(emb.name)
        for k, t in embedding_keys(base_model, emb).items():
            if k in tensors:
                raise SaveError(f"cannot save {path}: embedding {emb.name!r} appears twice")
            tensors[k] = t.detach().float() if dtype is None else t.detach().to(dtype)
        records.append({"name": emb.name, "vectors": emb.num_vectors, "init_text": emb.init_text,
                        "encoders": sorted(emb.vectors)})
    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    for k, t in tensors.items():
        if not torch.isfinite(t).all():
            # Never write a broken file: the last good save must stay the newest one.
            raise SaveError(f"cannot save {path}: tensor {k} holds NaN or infinite values "
                            "(training diverged? lower the learning rate)")
    # Validate what we are about to write with the same checks a reader applies.
    emb_tensors = {k: t for k, t in tensors.items() if k.startswith(EMB_PREFIX)}
    check_embeddings(str(path), parse_embeddings(str(path), emb_tensors)[0], base_model)
    _check_lora(str(path), {k: t for k, t in tensors.items() if k not in emb_tensors})
    model_hash = data_hash(tensors)
    meta = build_metadata(base_model, lora, records, info, model_hash)
    header = atomic_save(path, tensors, meta)
    if addnet_hash(path, header.header_size) != model_hash:
        raise SaveError(f"saved {path} but its data hash differs from the one recorded; please report this")
    return header


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def read_bundle(path: str | os.PathLike) -> Bundle:
    """Read and fully validate a bundle (or a plain LoRA, or a bundle from another writer)."""
    header, tensors = read_file(path)
    p = header.path
    for k, info in header.tensors.items():
        if info.dtype not in FLOAT_DTYPES:
            raise BundleError(p, f"dtype {info.dtype} is not a float type", key=k)
    for k, t in tensors.items():
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise BundleError(p, f"{bad} of {t.numel()} values are NaN or infinite; this file is broken "
                                 "(a training run that diverged?) and must not be loaded", key=k)
    emb_tensors = {k: t for k, t in tensors.items() if k.startswith(EMB_PREFIX)}
    rest = {k: t for k, t in tensors.items() if k not in emb_tensors}
    embeddings, emb_unknown, warnings = parse_embeddings(p, emb_tensors)
    single = embedding_file(p, rest) if not emb_tensors else None
    if single is not None:  # a one-embedding file (diffusers' {name}_emb, an exported embedding)
        embeddings, rest = {single.name: single}, {}
    sdxl_emb = any("clip_g" in e.vectors for e in embeddings.values())
    read, modules = read_lora_modules(p, rest, header.metadata, sdxl_emb, bool(embeddings))
    base, base_warnings = infer_base_model(header.metadata, read.base_hint, list(modules))
    read = to_kohya(p, read, modules, base, header.metadata)
    lora = read.tensors
    unknown = sorted(read.unknown + emb_unknown)
    warnings += base_warnings
    _check_lora(p, lora)
    check_embeddings(p, embeddings, base)
    if unknown:
        warnings.append(f"{len(unknown)} unknown key(s) ignored (first: {', '.join(unknown[:5])})")
    stored = header.metadata.get("sshs_model_hash")
    if stored and stored != addnet_hash(p, header.header_size):
        warnings.append("sshs_model_hash in the metadata does not match the file's data; "
                        "the webui will show a wrong hash (file edited after saving?)")
    if not lora and not embeddings:
        skipped = [w for w in warnings if " skipped: " in w]
        why = f" ({skipped[0]})" if skipped else ""
        raise BundleError(p, "holds neither LoRA weights (kohya, peft/diffusers) nor usable embeddings "
                             f"(bundle_emb.*, clip_l/clip_g){why}")
    bundle = Bundle(base, lora, embeddings, dict(header.metadata), p, unknown, warnings, header)
    bundle.formats, bundle.algorithms = read.formats, read.algorithms
    return bundle


def _check_lora(p: str, lora: dict[str, torch.Tensor]) -> None:
    """Each module's tensors form one known algorithm's consistent layout (checked without a model)."""
    for name, parts in group_by_module(lora).items():
        empty = [f"{w} {tuple(t.shape)}" for w, t in parts.items() if t.dim() and 0 in t.shape]
        if empty:
            raise BundleError(p, f"{', '.join(empty)}: an empty dimension", key=name)
        alpha = parts.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            raise BundleError(p, f"alpha must be a single number, got shape {tuple(alpha.shape)}", key=name)
        try:
            describe_module(parts)
        except (ValueError, ZeroDivisionError) as e:
            raise BundleError(p, str(e), key=name) from None


def infer_base_model(metadata: dict[str, str], key_hint: str | None,
                     modules: list[str]) -> tuple[str, list[str]]:
    """("sd1" | "sdxl", warnings) from metadata, cross-checked against what the keys say
    (``key_hint``: text-encoder prefixes, embeddings, the UNet blocks touched; see lora_parts)."""
    by_keys = key_hint
    version = metadata.get("ss_base_model_version", "")
    by_meta = ("sdxl" if version.startswith("sdxl") else "sd1") if version else None
    warnings = []
    if metadata.get("ss_v2") == "True":
        warnings.append("made for SD2 (ss_v2=True); Pivotal supports SD1 and SDXL")
    if by_meta and by_keys and by_meta != by_keys:
        warnings.append(f"metadata says {by_meta} (ss_base_model_version={version!r}) but the keys "
                        f"look like {by_keys}; trusting the keys")
        return by_keys, warnings
    if by_meta:
        return by_meta, warnings
    if by_keys:
        return by_keys, warnings
    # Blocks that do not tell, no metadata: kohya's SDXL files use LDM paths, its SD1 files diffusers ones.
    ldm_style = any(k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks",
                                  "lora_unet_middle_block")) for k in modules)
    return ("sdxl" if ldm_style else "sd1"), warnings


def bundle_name(path: str | os.PathLike) -> str:
    """The name the webui gives a LoRA file: its file name without the extension."""
    return Path(path).stem
