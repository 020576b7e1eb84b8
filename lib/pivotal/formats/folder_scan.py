"""Listing the ``.safetensors`` files of a folder tree without ever failing on the tree itself.

A webui's Lora folder is the user's: it can hold unreadable sub-folders, symlink loops, links to
nowhere, FIFOs and folders named ``x.safetensors``. Every scanner (name registry, bundle lists,
the generation-time loader) lists files here and reads each one on its own, so one bad entry
costs a warning naming it, never the scan.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

SUFFIX = ".safetensors"


def safetensors_files(folder: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """(regular ``*.safetensors`` files under ``folder``, sorted; warnings for what was skipped).

    Symlinked folders are followed, as the webui does, each real folder once (no loops). A missing
    folder holds nothing and is no warning.
    """
    root = Path(folder)
    files: list[Path] = []
    warnings: list[str] = []
    if not root.is_dir():
        return files, warnings
    seen: set[tuple[int, int]] = set()

    def on_error(e: OSError) -> None:
        warnings.append(f"skipped {e.filename}: cannot list it ({e.strerror or e})")

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError as e:
            warnings.append(f"skipped {dirpath}: {e.strerror or e}")
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # a link back up the tree
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in filenames:
            if not name.lower().endswith(SUFFIX):
                continue
            path = Path(dirpath) / name
            try:
                mode = path.stat().st_mode
            except OSError as e:
                warnings.append(f"skipped {path}: {e.strerror or e}")
                continue
            if stat.S_ISREG(mode):
                files.append(path)
            else:
                warnings.append(f"skipped {path}: not a regular file")
    files.sort()
    return files, warnings
