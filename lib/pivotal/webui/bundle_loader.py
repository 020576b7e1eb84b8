"""Bundle embeddings at generation time, where the webui does not already handle them.

A1111 >= 1.7's built-in Lora extension registers a bundle's ``bundle_emb.*`` embeddings while its
``<lora:…>`` tag is in the prompt; Pivotal never registers those twice (a name already in the
database is left alone, so a folder embedding or the built-in's registration always wins). On top:

* the option ``pivotal_bundle_embeddings_always``: every bundle in the Lora folder lends its
  embeddings to prompts that use their names, even without the ``<lora:…>`` tag;
* on a webui whose Lora loader ignores ``bundle_emb`` (see :func:`builtin_registers_bundles`), the
  embeddings of the bundles whose ``<lora:…>`` tags are in the prompt.

Registration happens in the script hook ``after_extra_networks_activate`` (after the webui's
per-generation reload and after the Lora extension's own registration) and is undone in
``postprocess``; a name that loses to a folder embedding is reported once, naming both files, and
``Pivotal bundle embeddings: name: bundle`` goes into the infotext as provenance.

Which bundle a name comes from: a bundle whose ``<lora:…>`` tag is in the prompt owns its names;
when two tagged bundles define one name, the first tag in the prompt wins (as A1111's own loader
decides) and a message names both; an untagged name lent by the option comes from the first
bundle by file name, with a message when several define it.

Forge and reForge: their Lora loaders ignore ``bundle_emb`` keys, so the tagged bundles' embeddings
are registered here; on Forge the webui handle's ``embedding_db`` fans out to every text engine's
database (:class:`pivotal.hosts.forge.webui.EngineDatabases`).
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from pivotal.errors import PivotalError

log = logging.getLogger(__name__)

OPTION = "pivotal_bundle_embeddings_always"
INFOTEXT_KEY = "Pivotal bundle embeddings"
#: attribute on the processing object listing what this generation registered
REGISTERED_ATTR = "pivotal_registered_embeddings"


@dataclass(frozen=True)
class BundleEmbeddingData:
    """One embedding of one bundle, in the data form the webui's ``create_embedding_from_data`` reads."""

    name: str
    bundle: str  # the bundle's file stem (its <lora:…> name)
    path: str
    data: dict[str, Any]
    alias: str = ""  # its ss_output_name, which the Lora loaders also accept in <lora:…>

    def named_by(self, tag: str) -> bool:
        """Whether ``<lora:tag…>`` names this bundle (by file name or alias)."""
        return tag == self.bundle or (bool(self.alias) and tag == self.alias)


def parse_bundle_embeddings(path: str) -> list[BundleEmbeddingData]:
    """The ``bundle_emb.<name>.<rest>`` tensors of a safetensors file, grouped per embedding as the
    webui's loader groups them (``string_to_param.<k>`` nested, other keys flat). BundleError for a
    file that cannot be read."""
    from pivotal.formats.embedding_keys import split_embedding_key, webui_embedding_data
    from pivotal.formats.safetensors_io import load_tensors, read_header

    header = read_header(path)
    keys = [k for k in header.tensors if split_embedding_key(k) is not None]
    if not keys:
        return []
    grouped = webui_embedding_data(load_tensors(header, keys).items())
    stem = Path(path).stem
    alias = str(header.metadata.get("ss_output_name", "") or "")
    return [BundleEmbeddingData(n, stem, path, d, alias) for n, d in sorted(grouped.items())]


class BundleIndex:
    """The bundle embeddings of a folder, each file read again only when its mtime or size change."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[tuple[int, int], list[BundleEmbeddingData]]] = {}
        self.problems: dict[str, str] = {}
        #: folders and entries the last scan could not list (unreadable, not a regular file)
        self.scan_warnings: list[str] = []

    def stamp(self, path: str) -> tuple[int, int]:
        """(mtime_ns, size) of ``path`` when it was last read."""
        cached = self._files.get(path)
        return cached[0] if cached is not None else (0, 0)

    def scan(self, folder: str) -> dict[str, BundleEmbeddingData]:
        """{embedding name: data}; with two bundles defining one name, the first path (sorted)."""
        return {name: entries[0] for name, entries in self.scan_all(folder).items()}

    def scan_all(self, folder: str) -> dict[str, list[BundleEmbeddingData]]:
        """{embedding name: every bundle's data for it, by path (sorted)}."""
        from pivotal.formats.folder_scan import safetensors_files

        found: dict[str, list[BundleEmbeddingData]] = {}
        seen: set[str] = set()
        paths, skipped = safetensors_files(folder)
        self.scan_warnings = skipped
        for path in paths:
            key = str(path)
            seen.add(key)
            try:
                st = path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
                cached = self._files.get(key)
                if cached is None or cached[0] != stamp:
                    self._files.pop(key, None)
                    self._files[key] = (stamp, parse_bundle_embeddings(key))
                    self.problems.pop(key, None)
            except (PivotalError, OSError) as e:
                self.problems[key] = str(e)  # listed by the caller's log, never silently dropped
                continue
            except Exception as e:  # noqa: BLE001 - this runs inside every generation: a bug in
                # reading one file must cost that file, never the user's picture
                self.problems[key] = f"unexpected {type(e).__name__}: {e}"
                continue
            for emb in self._files[key][1]:
                found.setdefault(emb.name, []).append(emb)
        for gone in set(self._files) - seen:
            del self._files[gone]
        for gone in set(self.problems) - seen:
            del self.problems[gone]
        return found


def builtin_registers_bundles(networks: Any) -> bool:
    """Whether the webui's Lora loader registers ``bundle_emb`` embeddings itself (A1111 >= 1.7)."""
    if networks is None:
        return False
    try:
        return "bundle_emb" in inspect.getsource(networks.load_network)
    except (AttributeError, OSError, TypeError):
        return False


def prompt_lora_names(p: Any) -> list[str]:
    """The ``<lora:NAME…>`` names of this generation (from the parsed extra-network data)."""
    data = getattr(p, "extra_network_data", None) or {}
    return [str(params.items[0]) for params in data.get("lora", []) if getattr(params, "items", None)]


def _mentioned(names: Iterable[str], prompts: Iterable[str]) -> set[str]:
    text = "\n".join(prompts).lower()
    return {n for n in names if n.lower() in text}


class BundleRegistrar:
    """Registers bundle embeddings for one generation and unregisters them after (see the module docstring)."""

    def __init__(self, index: Optional[BundleIndex] = None) -> None:
        self.index = index if index is not None else BundleIndex()
        self._warned: set[tuple[str, ...]] = set()
        self._last_signature: tuple = ()
        self._live: list[tuple[str, Any]] = []  # what the last generation registered

    def register(self, webui: Any, p: Any, lora_dir: str, always: bool) -> list[str]:
        """Register what this generation needs; returns the names registered (also kept on ``p``)."""
        from pivotal.hosts.a1111.session import clear_cond_cache

        from_tags = not builtin_registers_bundles(webui.networks)
        tags = prompt_lora_names(p)
        if not always and not from_tags and not tags:
            if self._last_signature:  # the option was just switched off: conds cached with our vectors are stale
                clear_cond_cache(webui)
                self._last_signature = ()
            return []
        db = webui.embedding_db
        if not hasattr(p, REGISTERED_ATTR):
            self._drop_leftovers(webui, p)  # a generation that failed before its postprocess
        available = self.index.scan_all(lora_dir)
        for path, problem in self.index.problems.items():
            self._warn_once(("problem", path), f"Pivotal: cannot read bundle {path}: {problem}")
        for warning in self.index.scan_warnings:
            self._warn_once(("scan", warning), f"Pivotal: {warning}")
        prompts = list(getattr(p, "all_prompts", None) or [getattr(p, "prompt", "")])
        prompts += list(getattr(p, "all_negative_prompts", None) or [getattr(p, "negative_prompt", "")])
        wanted = self._owners(available, tags, prompts, always, from_tags)
        ours_already = dict(getattr(p, REGISTERED_ATTR, []))  # an earlier batch / hires pass of this generation
        registered: list[str] = []
        for name in sorted(wanted):
            entry = wanted[name]
            existing = db.word_embeddings.get(name)
            if existing is not None and existing is ours_already.get(name):
                registered.append(name)
                continue
            if existing is not None:
                where = str(getattr(existing, "filename", "") or "")
                if not where.startswith(entry.path):
                    self._warn_once((name, where), f"Pivotal: embedding {name!r} from {where or 'the webui'} is used; "
                                                   f"the one in bundle {entry.path} is not")
                continue
            embedding = webui.textual_inversion.create_embedding_from_data(
                entry.data, name, filename=os.path.join(entry.path, name))
            expected = getattr(db, "expected_shape", -1)
            if expected not in (-1, embedding.shape):
                self._warn_once((name, "shape"), f"Pivotal: embedding {name!r} in {entry.path} has width "
                                                 f"{embedding.shape}, this model needs {expected}; not used")
                continue
            embedding.shorthash = entry.bundle  # what "TI hashes" shows: where the vectors came from
            if not getattr(embedding, "filename", ""):
                embedding.filename = os.path.join(entry.path, name)
            db.register_embedding_by_name(embedding, p.sd_model, name)
            registered.append(name)
        # The webui's cond cache is keyed on prompts, not on which vectors a name means: when the
        # set lent to prompts changes (option toggled, bundle rewritten), cached conds are stale.
        signature = tuple((n, wanted[n].path, self.index.stamp(wanted[n].path)) for n in registered)
        if signature != self._last_signature:
            clear_cond_cache(webui)
            self._last_signature = signature
        used = sorted(_mentioned(registered, prompts))  # provenance of the names the prompts use
        if used:
            p.extra_generation_params[INFOTEXT_KEY] = ", ".join(f"{n}: {wanted[n].bundle}" for n in used)
        mine = [(n, db.word_embeddings[n]) for n in registered]
        setattr(p, REGISTERED_ATTR, mine)
        self._live = list(mine)
        return registered

    def _owners(self, available: dict[str, list[BundleEmbeddingData]], tags: list[str], prompts: list[str],
                always: bool, from_tags: bool) -> dict[str, BundleEmbeddingData]:
        """{name: the bundle whose embedding this generation uses}. A bundle whose ``<lora:…>`` tag
        is in the prompt owns its names (two such bundles with one name: the first tag in the
        prompt, with a message); with ``always``, a name the prompt mentions whose bundles are not
        tagged comes from the first of them by path (with a message when there are several).
        Where the webui's own loader registers tagged bundles (A1111), it applies the same rule;
        only the message is added here."""
        mentioned = _mentioned(available, prompts) if always else set()
        wanted: dict[str, BundleEmbeddingData] = {}
        for name, entries in available.items():
            tagged = sorted((e for e in entries if any(e.named_by(t) for t in tags)),
                            key=lambda e: min(i for i, t in enumerate(tags) if e.named_by(t)))
            if tagged:
                others = sorted({e.bundle for e in tagged[1:]} - {tagged[0].bundle})
                if others:
                    self._warn_once(("clash", name, tagged[0].path, *others),
                                    f"Pivotal: embedding {name!r} is in bundles {tagged[0].bundle} and "
                                    f"{', '.join(others)} of this prompt; {tagged[0].bundle}'s is used (its <lora:…> "
                                    "tag comes first)")
                if from_tags or always:
                    wanted[name] = tagged[0]
            elif name in mentioned:
                others = sorted({e.bundle for e in entries[1:]} - {entries[0].bundle})
                if others:
                    self._warn_once(("ambiguous", name, entries[0].path, *others),
                                    f"Pivotal: embedding {name!r} is in bundles {entries[0].bundle} and "
                                    f"{', '.join(others)}; {entries[0].bundle}'s is used (first by file name); add "
                                    "the wanted bundle's <lora:…> tag to choose")
                wanted[name] = entries[0]
        return wanted

    def _drop_leftovers(self, webui: Any, p: Any) -> None:
        """Unregister what an earlier generation registered and never took back (it failed before
        its postprocess; Forge, unlike A1111, does not reload its databases per generation)."""
        db = webui.embedding_db
        for name, embedding in self._live:
            if db.word_embeddings.get(name) is embedding:
                db.register_embedding_by_name(None, p.sd_model, name)
        self._live = []

    def unregister(self, webui: Any, p: Any) -> None:
        """Remove what :meth:`register` added for ``p`` (only entries that are still ours)."""
        db = webui.embedding_db
        for name, embedding in getattr(p, REGISTERED_ATTR, []):
            if db.word_embeddings.get(name) is embedding:
                db.register_embedding_by_name(None, p.sd_model, name)
        setattr(p, REGISTERED_ATTR, [])
        self._live = []

    def _warn_once(self, key: tuple[str, ...], message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)
            print(message)  # the webui's console is where users look
