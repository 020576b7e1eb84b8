"""The A1111 webui modules the host adapter uses, imported only when a host is built.

The adapter never imports ``modules.*`` at import time: this package must import anywhere (the
standalone app, the unit tests), and inside the webui the model is only there once it has loaded.
:func:`load_webui` gathers the modules in one :class:`Webui` object, which tests replace with a
fake (glue tests only; the real behaviour is proven against a real webui in tests/integration).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Optional

from pivotal.errors import ModelLayoutError

#: the webui modules the adapter needs (attribute name -> module path)
REQUIRED_MODULES = {
    "shared": "modules.shared",
    "devices": "modules.devices",
    "sd_hijack": "modules.sd_hijack",
    "processing": "modules.processing",
    "textual_inversion": "modules.textual_inversion.textual_inversion",
}
#: the module name under which the built-in Lora extension's loader lives (it is not a package)
LORA_MODULE = "networks"


@dataclass
class Webui:
    """Handles on the webui's modules. ``networks`` is the built-in Lora extension's loader, or
    None when that extension is disabled (or on a webui that has none)."""

    shared: Any
    devices: Any
    sd_hijack: Any
    processing: Any
    textual_inversion: Any
    networks: Optional[Any] = None
    call_queue: Optional[Any] = None

    @property
    def sd_model(self) -> Any:
        """The loaded checkpoint (``shared.sd_model``; accessing it loads one if none is)."""
        model = self.shared.sd_model
        if model is None:
            raise ModelLayoutError("the webui has no model loaded (shared.sd_model is None); "
                                   "pick a checkpoint in the webui first")
        return model

    @property
    def embedding_db(self) -> Any:
        """The webui's textual-inversion database (``sd_hijack.model_hijack.embedding_db``)."""
        return self.sd_hijack.model_hijack.embedding_db


def load_webui() -> Webui:
    """Import the running webui's modules. ModelLayoutError when this is not an A1111-style webui
    (for example Forge, whose model objects differ, or a plain Python process)."""
    found = {attr: webui_module(path[len("modules."):]) for attr, path in REQUIRED_MODULES.items()}
    networks = sys.modules.get(LORA_MODULE)
    if networks is not None and not hasattr(networks, "load_networks"):
        networks = None  # some other module called "networks", not the Lora extension's
    call_queue = optional_webui_module("call_queue")
    return Webui(networks=networks, call_queue=call_queue, **found)


def webui_module(name: str) -> Any:
    """``modules.<name>`` of the running webui: the one way Pivotal's webui glue reaches the
    webui's modules. ModelLayoutError outside a webui."""
    path = f"modules.{name}"
    try:
        return importlib.import_module(path)
    except ImportError as e:
        raise ModelLayoutError(f"not running inside an A1111-style webui: cannot import {path} ({e})") from e


def optional_webui_module(name: str) -> Optional[Any]:
    """``modules.<name>``, or None where this webui has no such module."""
    try:
        return importlib.import_module(f"modules.{name}")
    except ImportError:
        return None


def optional_module(path: str) -> Optional[Any]:
    """Any importable module of the running webui by its full dotted path (e.g. reForge's
    ``ldm_patched.modules.model_management``), or None where this webui has none."""
    try:
        return importlib.import_module(path)
    except ImportError:
        return None


def webui_paths() -> dict[str, str]:
    """The webui's folders Pivotal uses: ``lora_dir``, ``outputs`` (the run folders' parent)."""
    import os

    shared, paths_internal = webui_module("shared"), webui_module("paths_internal")
    lora = getattr(shared.cmd_opts, "lora_dir", "") or os.path.join(paths_internal.models_path, "Lora")
    outputs = os.path.join(paths_internal.data_path, "outputs", "pivotal")
    return {"lora_dir": str(lora), "outputs": outputs}
