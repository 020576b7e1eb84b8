"""Which A1111-style webui Pivotal runs in, and the host and handles for it.

* ``"a1111"``: AUTOMATIC1111 (ldm/sgm models, ``sd_hijack``);
* ``"reforge"``: Panchovix's reForge, an A1111 shell over the old Forge ``ldm_patched`` backend: the
  A1111 host works there (with the reForge points it handles);
* ``"forge"``: lllyasviel's Forge with its 2024 ``backend``: the Forge host.

The webui glue asks here, and never imports a host by name.
"""

from __future__ import annotations

import importlib.util
from typing import Any

KINDS = ("a1111", "forge", "reforge")


def _present(module: str) -> bool:
    parent = module.split(".", 1)[0]
    try:
        return importlib.util.find_spec(parent) is not None and importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def webui_kind() -> str:
    """"forge", "reforge" or "a1111" (also outside any webui)."""
    if _present("backend.diffusion_engine") and _present("modules_forge"):
        return "forge"
    if _present("ldm_patched") and _present("modules_forge"):
        return "reforge"
    return "a1111"


def load_webui() -> Any:
    """The running webui's handles: a :class:`~pivotal.hosts.forge.webui.ForgeWebui` on Forge, the
    A1111 :class:`~pivotal.hosts.a1111.webui.Webui` elsewhere (the glue reads the same attributes)."""
    if webui_kind() == "forge":
        from pivotal.hosts.forge.webui import load_forge_webui

        return load_forge_webui()
    from pivotal.hosts.a1111.webui import load_webui as load_a1111

    return load_a1111()


def training_host(**preview: Any) -> Any:
    """A training host over the model the webui has loaded now; ``preview``: ``preview_sampler`` /
    ``preview_scheduler`` / ``preview_cfg``."""
    if webui_kind() == "forge":
        from pivotal.hosts.forge.host import ForgeHost

        return ForgeHost(**preview)
    from pivotal.hosts.a1111.host import A1111Host

    return A1111Host(**preview)


def host_state(webui: Any) -> dict[str, Any]:
    """What the loaded model looks like now (``GET /pivotal/v1/host``)."""
    if getattr(webui, "kind", "") == "forge":
        from pivotal.hosts.forge.state import host_state as forge_state

        return forge_state(webui)
    from pivotal.hosts.a1111.state import host_state as a1111_state

    return a1111_state(webui)


def install_lora_file_filter(webui: Any) -> bool:
    """On Forge: its Lora loader reads files without their bundled embeddings (see
    :mod:`pivotal.hosts.forge.lora_files`); elsewhere nothing to do."""
    if getattr(webui, "kind", "") != "forge" or webui.networks is None:
        return False
    from pivotal.hosts.forge.lora_files import install

    return install(webui.networks)


def uninstall_lora_file_filter() -> bool:
    """Undo :func:`install_lora_file_filter` (before a UI reload)."""
    import sys

    networks = sys.modules.get("networks")
    if networks is None:
        return False
    from pivotal.hosts.forge.lora_files import uninstall

    return uninstall(networks)
