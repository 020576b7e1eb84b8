"""The bundles in an output folder, newest first, with the embedding names each one holds.

Names come from the safetensors header alone (no tensor is read), so listing a folder of large
files stays instant. Resume files (``*.resume.safetensors``) sit beside the bundles and are not
bundles: they are left out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pivotal.errors import PivotalError
from pivotal.formats.folder_scan import safetensors_files
from pivotal.formats.name_registry import bundle_embedding_names

RESUME_SUFFIX = ".resume.safetensors"


@dataclass
class BundleEntry:
    """One bundle: how the dropdown shows it, where it is, and its embedding names."""

    label: str
    path: str
    names: list[str]
    mtime: float

    @property
    def lora_name(self) -> str:
        """The name ``<lora:NAME:w>`` uses: the file name without its extension."""
        return Path(self.path).stem


def find_bundles(folder: str | os.PathLike) -> tuple[list[BundleEntry], list[str]]:
    """(bundles under ``folder``, newest first; one warning per unreadable file).

    A missing folder is not an error: it simply holds no bundles yet.
    """
    root = Path(folder)
    entries: list[BundleEntry] = []
    paths, warnings = safetensors_files(root)
    for p in paths:
        if p.name.endswith(RESUME_SUFFIX):
            continue
        try:
            names = bundle_embedding_names(p)
            mtime = p.stat().st_mtime
        except (PivotalError, OSError) as e:
            warnings.append(f"skipped {p}: {e}")
            continue
        entries.append(BundleEntry(p.relative_to(root).as_posix(), str(p), names, mtime))
    entries.sort(key=lambda e: (-e.mtime, e.label))
    return entries, warnings


def describe(entry: BundleEntry) -> str:
    """One line for the page: the prompt tag to use and the embedding names to write."""
    names = ", ".join(entry.names) if entry.names else "(none: a plain LoRA)"
    return f"<lora:{entry.lora_name}:1> — embeddings: {names}"
