"""How often each image trains and how much its loss counts, from the dataset's folders.

Two conventions other trainers' users already write (``folder_repeats``):

* **repeats** (kohya's sd-scripts): a sub-folder of the dataset named ``N_name`` (``10_mychar``)
  puts each of its images N times into every epoch, so a small folder is seen as often as a big
  one. The first folder under the dataset decides, for the images nested below it too.
* **loss scale** (EveryDream2's ``loss_scale.txt``): a file ``loss_scale.txt`` holding one number
  > 0 multiplies the loss of the images directly in its folder (not those of sub-folders), e.g.
  ``0.5`` to let a folder of weaker pictures count half. A single image's weight is its folder's.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable

from pivotal.errors import DatasetError

REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
LOSS_SCALE_FILE = "loss_scale.txt"
#: More repeats than this is a typo (kohya datasets use 1-100)
MAX_REPEATS = 10_000


def folder_repeats(image_name: str) -> tuple[str, int] | None:
    """``(folder, N)`` when the image (relative name, "/") lies under a first-level ``N_name``
    folder; None otherwise. DatasetError for N = 0 or an absurd N."""
    head, sep, _ = image_name.partition("/")
    match = REPEAT_FOLDER.match(head) if sep else None
    if match is None:
        return None
    n = int(match.group(1))
    if not 1 <= n <= MAX_REPEATS:
        raise DatasetError(f"folder {head}: {n} repeats (N_name) must be between 1 and {MAX_REPEATS}; "
                           "rename the folder")
    return head, n


def read_loss_scale(path: Path, name: str) -> float:
    """The number in a ``loss_scale.txt``; DatasetError naming the file unless it is finite and > 0."""
    try:
        text = path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{name}: cannot be read ({e})") from e
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"{name}: {text[:40]!r} is not a number; write one number > 0, e.g. 0.5") from None
    if not math.isfinite(value) or value <= 0:
        raise DatasetError(f"{name}: {value} must be a finite number > 0 (0.5 halves the folder's loss)")
    return value


class LossScales:
    """The ``loss_scale.txt`` files among a dataset's files: ``of(image)`` is its folder's scale."""

    def __init__(self, folder: Path, files: Iterable[Path]) -> None:
        self.files: dict[Path, Path] = {p.parent: p for p in files if p.name.lower() == LOSS_SCALE_FILE}
        self.values: dict[str, float] = {}  # {file, relative: value}
        self.errors: list[str] = []
        self._by_folder: dict[Path, float] = {}
        for parent, path in sorted(self.files.items()):
            name = path.relative_to(folder).as_posix()
            try:
                value = read_loss_scale(path, name)
            except DatasetError as e:
                self.errors.append(str(e))
                continue
            self.values[name] = value
            self._by_folder[parent] = value

    def of(self, image: Path) -> float:
        """The loss weight of ``image``: its own folder's loss scale, else 1."""
        return self._by_folder.get(image.parent, 1.0)
