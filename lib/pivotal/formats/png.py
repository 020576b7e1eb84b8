"""PNG files with the webui's "parameters" text chunk, and their JSON sidecars, written atomically."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable

from pivotal.errors import SaveError


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """``write(file)`` into a temp file beside ``path``, fsync, rename: the previous file, if any,
    stays intact unless the new one is complete. SaveError on failure."""
    target = Path(path)
    tmp = target.parent / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        # os.open with 0o666, not mkstemp (0o600): the file gets the permissions any new file
        # gets under the user's umask.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise SaveError(f"cannot save {target}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as e:
        raise SaveError(f"cannot save {target}: {e.strerror or e} (the previous file, if any, is unchanged)") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def write_png(path: str | os.PathLike, image: Any, parameters: str) -> None:
    """Save ``image`` (PIL) as PNG with a "parameters" text chunk (what the webui's PNG Info tab
    reads), atomically. SaveError on failure."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("parameters", parameters)
    _atomic_write(path, lambda fh: image.save(fh, format="PNG", pnginfo=meta))


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented UTF-8 JSON, atomically. SaveError on failure."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    _atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
