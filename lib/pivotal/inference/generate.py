"""Generate an image with bundles applied from ``<lora:NAME:weight>`` prompt tags, on any host.

The prompt syntax is the webui's (:mod:`pivotal.inference.lora_tags`): ``<lora:NAME>``,
``<lora:NAME:WEIGHT>`` or ``<lora:NAME:te=T:unet=U>`` anywhere in the prompt; the tag is removed from
the text, ``NAME.safetensors`` is found in the LoRA folders, its text-encoder and UNet parts attached
at those strengths and its bundled embeddings made available by name (also at strength 0). Everything
is detached again when the image is done, however that ends. No host is imported here: the host
object passed in provides ``lora_targets``, ``vocabulary``, ``tokenizer`` and ``generate``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from pivotal import __version__
from pivotal.adapters.network import LoraNetwork, Target
from pivotal.errors import ConfigError
from pivotal.formats.safetensors_io import addnet_hash
from pivotal.host_api import TrainingHost
from pivotal.inference.bundle_load import load_bundle_for_model
from pivotal.inference.lora_tags import OTHER_TAG, parse_lora_tags
from pivotal.text.embeddings import EmbeddingSet
from pivotal.text.inject import PromptTokenizer

#: Load with the widest preset, so a bundle trained with any preset finds all its modules.
WIDEST_PRESET = "attn-mlp-conv"
PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")
SAMPLER_NAMES = {"euler": "Euler", "ddim": "DDIM"}
#: length of the LoRA hash the webui shows ("Lora hashes" in infotext)
SHORT_HASH = 12


def _check_name(name: str) -> None:
    if name in (".", "..") or any(c in name for c in "/\\:\0"):
        raise ConfigError(f"LoRA name {name!r} must be a file name without folders (prompt tag <lora:{name}:...>)")


def find_bundle(name: str, folders: Sequence[str | os.PathLike]) -> Path:
    """``NAME.safetensors`` in the first folder that has it; else a unique case-insensitive match
    anywhere below the folders (the webui also finds LoRAs in subfolders).

    ConfigError naming the folders when absent (and saying so when only a pickle file of that
    name exists), or when several files match.
    """
    _check_name(name)
    roots = [Path(f) for f in folders]
    if not roots:
        raise ConfigError(f"<lora:{name}>: no LoRA folder given (setting: --lora-dir)")
    for root in roots:
        exact = root / f"{name}.safetensors"
        if exact.is_file():
            return exact
    matches: list[Path] = []
    pickles: list[Path] = []
    for root in roots:
        if root.is_dir():
            for p in sorted(root.rglob("*")):
                if p.stem.lower() == name.lower() and p.is_file():
                    if p.suffix.lower() == ".safetensors":
                        matches.append(p)
                    elif p.suffix.lower() in PICKLE_SUFFIXES:
                        pickles.append(p)
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"<lora:{name}> matches several files: {', '.join(map(str, matches))}; "
                          "rename one or keep one folder")
    where = ", ".join(str(r) for r in roots)
    hint = (f"; found {pickles[0]}, but only .safetensors files are loaded (pickle files can run code): "
            f"convert a trusted one with `pivotal convert`") if pickles else ""
    raise ConfigError(f"<lora:{name}>: no {name}.safetensors in {where}{hint}")


def _host_modules(net: LoraNetwork) -> set[int]:
    return {id(m.host) for m in net.modules_of()}


def generate_image(host: TrainingHost, prompt: str, negative: str, lora_dirs: Sequence[str | os.PathLike],
                   steps: int, seed: int, width: int | None, height: int | None,
                   guidance: float) -> tuple[Any, dict[str, Any]]:
    """Generate one image with the prompt's ``<lora:...>`` bundles applied.

    ``width`` / ``height`` None: the host's ``default_resolution()``. Returns ``(PIL image, info)``;
    ``info`` holds the clean prompts, the settings, ``loras`` ([{name, weight, path, hash}]),
    ``embeddings`` (names) and ``warnings`` (strings).
    Every LoRA attached here is detached before returning or raising.
    """
    clean, tags = parse_lora_tags(prompt)
    neg_clean, neg_tags = parse_lora_tags(negative)
    warnings: list[str] = []
    if neg_tags:
        warnings.append(f"LoRA tags in the negative prompt are ignored ({', '.join(t.name for t in neg_tags)})")
    for text in (clean, neg_clean):
        for m in OTHER_TAG.finditer(text):
            warnings.append(f"{m.group(0)!r}: only <lora:...> tags are applied; this one stays in the prompt as text")
    default = host.default_resolution()
    width, height = width or default, height or default
    embeddings = EmbeddingSet()
    loras: list[dict[str, Any]] = []
    attached: list[tuple[str, LoraNetwork]] = []
    targets: list[Target] = []
    dims: dict[str, int] = {}
    if tags:
        targets = host.lora_targets("unet", WIDEST_PRESET) + host.lora_targets("te", WIDEST_PRESET)
        dims = {k: int(host.vocabulary(k).shape[1]) for k in host.encoder_keys()}
    try:
        for tag in tags:
            name = tag.name
            path = find_bundle(name, lora_dirs)
            loaded = load_bundle_for_model(path, host.base_model, targets, dims)
            warnings.extend(loaded.warnings)
            for emb_name, emb in loaded.embeddings.items():
                clash = next((n for n in embeddings.names() if n.lower() == emb_name.lower()), None)
                if clash is not None:
                    warnings.append(f"embedding {emb_name!r} from {path} skipped: an earlier LoRA in the prompt "
                                    f"already brought {clash!r}")
                    continue
                embeddings.add(emb_name, {k: emb.vectors[k] for k in host.encoder_keys()})
            net = loaded.network
            if net is not None:
                for other, other_net in attached:
                    if _host_modules(net) & _host_modules(other_net):
                        raise ConfigError(f"<lora:{name}> and <lora:{other}> change the same layers; applying "
                                          "several LoRAs at once is not supported yet, use one per image")
                net.to(host.device)
                for part in net.parts:
                    net.set_multiplier(part, tag.unet if part == "unet" else tag.te)
                net.attach()
                attached.append((name, net))
            loras.append({"name": name, "weight": tag.weight, "te": tag.te, "unet": tag.unet, "path": str(path),
                          "hash": addnet_hash(path)[:SHORT_HASH], "has_lora": net is not None,
                          "embeddings": sorted(loaded.embeddings)})
        warnings.extend(_prompt_warnings(host, embeddings, clean, neg_clean))
        image = host.generate(clean, neg_clean, embeddings, steps, seed, width, height, guidance)
    finally:
        for _name, net in reversed(attached):
            net.detach()
    info: dict[str, Any] = {
        "prompt": prompt, "clean_prompt": clean, "negative": negative, "clean_negative": neg_clean,
        "steps": steps, "seed": seed, "width": width, "height": height, "guidance": guidance,
        "sampler": host.sampler, "model": host.label,
        "base_model": host.base_model, "loras": loras, "embeddings": embeddings.names(), "warnings": warnings,
    }
    return image, info


def _prompt_warnings(host: TrainingHost, embeddings: EmbeddingSet, *prompts: str) -> list[str]:
    """Embedding names that are also ordinary words, and prompts cut at the 75-token limit."""
    counts = {n: embeddings.num_vectors(n) for n in embeddings.names()}
    # The pad id only fills the tail of the id row, which these checks never read.
    tok = PromptTokenizer(host.tokenizer(host.encoder_keys()[0]), counts, pad_id=0)
    out = list(tok.warnings)
    for text in prompts:
        if text and tok.build_prompt_ids(text).truncated:
            out.append(f"prompt {text[:40]!r}... is longer than 75 tokens; the rest is cut")
    return out


def _quote(value: str) -> str:
    """A webui infotext value: quoted (JSON-style) when it holds a comma, colon or newline."""
    if not any(c in value for c in ',:\n"'):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def format_infotext(info: dict[str, Any]) -> str:
    """The webui's "parameters" text for ``info`` from :func:`generate_image`::

        PROMPT
        Negative prompt: NEGATIVE
        Steps: 20, Sampler: Euler, CFG scale: 7.0, Seed: 0, Size: 512x512, Model: ...,
        Lora hashes: "a: 0123abcd4567", Version: pivotal 0.1.0

    (the last two lines are one line in the text, wrapped here)
    """
    lines = [info["prompt"]]
    if info["negative"]:
        lines.append(f"Negative prompt: {info['negative']}")
    fields = [("Steps", str(info["steps"]))]
    sampler = SAMPLER_NAMES.get(str(info.get("sampler", "")), str(info.get("sampler", "")))
    if sampler:
        fields.append(("Sampler", sampler))
    fields += [("CFG scale", f"{info['guidance']:g}"), ("Seed", str(info["seed"])),
               ("Size", f"{info['width']}x{info['height']}"), ("Model", str(info["model"]))]
    if info["loras"]:
        fields.append(("Lora hashes", ", ".join(f"{lo['name']}: {lo['hash']}" for lo in info["loras"])))
    fields.append(("Version", f"pivotal {__version__}"))
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields))
    return "\n".join(lines)
