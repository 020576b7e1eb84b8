"""``pivotal inspect``: what a user needs to know about a bundle, as a dict and as text."""

from __future__ import annotations

import os
from typing import Any

from pivotal.adapters.algorithms import describe_module
from pivotal.adapters.kohya_keys import part_of_key
from pivotal.errors import printable
from pivotal.formats.bundle import Bundle, bundle_name, read_bundle
from pivotal.formats.json_limits import loads_limited
from pivotal.formats.safetensors_io import addnet_hash

#: Metadata shown in the summary. Everything else is counted, not shown: values can be huge or
#: hostile (HTML/JS), and the raw view is one ``--json`` away for those who want it.
SUMMARY_KEYS = ("ss_output_name", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                "ss_network_alpha", "ss_resolution", "ss_num_train_images", "ss_sd_model_name",
                "sshs_model_hash", "modelspec.architecture", "modelspec.date", "pivotal.version")
MAX_SHOWN_VALUE = 200


def _short(value: str) -> str:
    return value if len(value) <= MAX_SHOWN_VALUE else value[:MAX_SHOWN_VALUE] + f"… ({len(value)} chars)"


def _init_texts(meta: dict[str, str]) -> dict[str, str]:
    """Init texts recorded in ``pivotal.embeddings`` (absent or malformed: none)."""
    raw = meta.get("pivotal.embeddings", "")
    if not raw or len(raw) > 1_000_000:
        return {}
    try:
        records = loads_limited(raw)
    except ValueError:  # malformed or hostile metadata: the report just lacks init texts
        return {}
    if not isinstance(records, list):
        return {}
    # only strings: str() of an arbitrary nested value can recurse as deep as the JSON did
    texts: dict[str, str] = {}
    for r in records:
        if isinstance(r, dict) and isinstance(r.get("name"), str):
            init = r.get("init_text")
            texts[r["name"]] = init if isinstance(init, str) else ""
    return texts


def lora_summary(bundle: Bundle) -> dict[str, dict[str, Any]]:
    """Per part: module count, the algorithms ("lora", "loha", "lokr", "+dora"), the distinct
    ranks and alphas (no alpha in the file: rank, i.e. scale 1)."""
    parts: dict[str, dict[str, Any]] = {}
    for name, tensors in bundle.lora_modules().items():
        s = parts.setdefault(part_of_key(name), {"modules": 0, "algorithms": set(), "ranks": set(),
                                                 "alphas": set()})
        lay = describe_module(tensors)
        s["modules"] += 1
        s["algorithms"].add(lay.label)
        s["ranks"].add(lay.rank)
        s["alphas"].add(lay.alpha if lay.alpha is not None else float(lay.rank))
    return {p: {"modules": s["modules"], "algorithms": sorted(s["algorithms"]), "ranks": sorted(s["ranks"]),
                "alphas": sorted(s["alphas"]), "format": ", ".join(bundle.formats.get(p, ["kohya"]))}
            for p, s in sorted(parts.items())}


def inspect_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON report: base_model, lora_modules, lora, embeddings, metadata, hash, warnings."""
    bundle = read_bundle(path)
    inits = _init_texts(bundle.metadata)
    lora = lora_summary(bundle)
    embeddings = []
    for emb in bundle.embeddings.values():
        norms = {k: [round(float(v), 4) for v in t.float().norm(dim=1)] for k, t in sorted(emb.vectors.items())}
        embeddings.append({"name": emb.name, "vectors": emb.num_vectors, "norms": norms,
                           "init_text": inits.get(emb.name, "")})
    computed = addnet_hash(path, bundle.header.header_size if bundle.header else None)
    return {
        "file": str(path),
        "lora_name": bundle_name(path),
        "base_model": bundle.base_model,
        "lora_modules": {p: s["modules"] for p, s in lora.items()},
        "lora": lora,
        "embeddings": embeddings,
        "metadata": {k: _short(bundle.metadata[k]) for k in SUMMARY_KEYS if k in bundle.metadata},
        "metadata_keys": len(bundle.metadata),
        "hash": {"stored": bundle.metadata.get("sshs_model_hash", ""), "computed": computed},
        "unknown_keys": {"count": len(bundle.unknown_keys), "first": bundle.unknown_keys[:5]},
        "warnings": bundle.warnings,
    }


def format_report(r: dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_bundle`'s report."""
    lines = [f"{r['file']}", f"  base model: {r['base_model']}    LoRA name in prompts: <lora:{r['lora_name']}:1>"]
    if r["lora"]:
        lines.append("  LoRA modules:")
        for part, s in r["lora"].items():
            lines.append(f"    {part:<5} {s['modules']:>4} modules   {_join(s['algorithms'])}   "
                         f"rank {_join(s['ranks'])}   alpha {_join(s['alphas'])}   ({s['format']})")
    else:
        lines.append("  LoRA modules: none (embeddings only)")
    if r["embeddings"]:
        lines.append("  embeddings (use the name in prompts):")
        for e in r["embeddings"]:
            norms = "  ".join(f"{k} norm {_join(v)}" for k, v in e["norms"].items())
            init = f"   init {e['init_text']!r}" if e["init_text"] else ""
            lines.append(f"    {e['name']:<20} {e['vectors']} vector(s)   {norms}{init}")
    else:
        lines.append("  embeddings: none")
    lines.append(f"  hash: {r['hash']['computed'][:12]} (sha256 of the data, as the webui computes it)")
    if r["metadata"]:
        lines.append(f"  metadata ({r['metadata_keys']} keys):")
        for k, v in r["metadata"].items():
            lines.append(f"    {k} = {v}")
    for w in r["warnings"]:
        lines.append(f"  warning: {w}")
    # every line quotes the file (names, metadata): keep each one line and free of escape codes
    return "\n".join(printable(line) for line in lines)


def _join(values: list) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)

