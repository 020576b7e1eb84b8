"""Reading a settings file (``.toml`` or ``.json``) into a dict, with errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pivotal.errors import ConfigError


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.toml`` or ``.json`` settings file into a dict (ConfigError naming the file)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror or e}") from e
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(raw.decode("utf-8-sig"))
        else:
            try:
                import tomllib  # Python 3.11+
            except ModuleNotFoundError:  # Python 3.10 (the webui's): the tomli backport
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ModuleNotFoundError:
                    raise ConfigError(f"reading {p} needs Python 3.11 or the 'tomli' package; "
                                      "use a .json config instead") from None
            data = tomllib.loads(raw.decode("utf-8-sig"))
    except ConfigError:
        raise
    except Exception as e:  # json/toml decode errors of either module
        raise ConfigError(f"config {p} is not valid {p.suffix.lstrip('.') or 'TOML'}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config {p} must hold a table of settings")
    return data
