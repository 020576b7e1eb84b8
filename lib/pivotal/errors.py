"""Typed errors. Every message names the file, key or setting at fault and, where one exists, the fix."""

from __future__ import annotations

#: Longest file-derived text (tensor or metadata key) quoted in a message.
MAX_QUOTED = 200


def printable(text: str, limit: int = 0) -> str:
    """``text`` safe for one terminal line: control characters, line breaks and lone surrogates
    (all possible in names read from a file) become escapes; ``limit`` > 0 cuts it with "…"."""
    if limit and len(text) > limit:
        text = text[:limit] + "…"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   if ord(c) < 0xD800 or ord(c) > 0xDFFF else f"\\u{ord(c):04x}" for c in text)


class PivotalError(Exception):
    """Base class of every error Pivotal raises on purpose."""


class BundleError(PivotalError):
    """A bundle, LoRA or embedding file is unreadable, malformed or unsafe.

    ``path`` is the file; ``key`` the tensor or metadata key at fault, when there is one.
    """

    def __init__(self, path: object, problem: str, key: str | None = None) -> None:
        self.path = str(path)
        self.key = key
        self.problem = problem
        where = f"{self.path}" + (f" [{printable(key, MAX_QUOTED)}]" if key else "")
        # one line whatever the file holds: names and values quoted from it are escaped
        super().__init__(printable(f"{where}: {problem}"))


class UnsafeFileError(BundleError):
    """A pickle-based file (.pt/.ckpt/.bin/.pth) was offered where only safetensors is accepted."""


class SaveError(PivotalError):
    """Writing a file failed; the previous file at that path is intact."""


class EmbeddingNameError(PivotalError):
    """An embedding name is not allowed (characters, length, reserved, or a clash)."""


class ModelLayoutError(PivotalError):
    """A model does not have the structure expected (unknown UNet / text-encoder layout)."""


class LoraTargetError(PivotalError):
    """LoRA targets cannot be found, attached or loaded (no match, already attached, bad shape)."""


class ConfigError(PivotalError):
    """A training setting is missing or out of range; the message names the setting."""


class NotFoundError(ConfigError):
    """A file or bundle a setting names does not exist (HTTP 404 in the API); the message names
    the setting and where it was looked for."""


class TrainingError(PivotalError):
    """A run cannot start or had to stop (diverged, refused resume, host problem)."""


class DatasetError(PivotalError):
    """The training images or captions cannot be used as they are, or a dataset setting is invalid.

    The message names the folder, file or setting at fault and the fix. ``report`` is the
    pre-flight report (``pivotal.data.dataset.PreflightReport``) when the refusal came from one, so a
    UI can still show everything that was found.
    """

    def __init__(self, message: str, report: object | None = None) -> None:
        self.report = report
        super().__init__(message)
