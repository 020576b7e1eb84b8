"""The webui script (always on, no UI) that lends bundle embeddings to generations.

Imported only by the extension's entry file inside the webui: the class must subclass the webui's
``modules.scripts.Script`` to be found there. The work is in :mod:`pivotal.webui.bundle_loader`.
A failure here never fails (or prints a traceback into) the user's generation: it is reported in one
line and the generation goes on without the bundle embeddings.
"""

from __future__ import annotations

import logging
from typing import Any

from pivotal.hosts.a1111.webui import webui_module
from pivotal.hosts.webuis import install_lora_file_filter, load_webui
from pivotal.webui.bundle_loader import OPTION, BundleRegistrar
from pivotal.webui.runner import webui_paths

scripts, shared = webui_module("scripts"), webui_module("shared")  # this file is imported inside the webui only
_registrar = BundleRegistrar()
log = logging.getLogger(__name__)


def add_settings() -> None:
    """The option in Settings > Pivotal (``on_ui_settings``)."""
    shared.opts.add_option(OPTION, shared.OptionInfo(
        False, "Make the embeddings of every bundle in the Lora folder usable in prompts without its <lora:…> tag "
               "(an embeddings-folder file of the same name always wins)", section=("pivotal", "Pivotal")))


def _report(what: str, error: BaseException) -> None:
    message = f"Pivotal bundle embeddings: {what} failed, the generation goes on without them: {error}"
    log.warning(message)
    print(message)


class PivotalBundleEmbeddings(scripts.Script):
    """Registers bundle embeddings after the extra networks of a batch are active, unregisters after."""

    def title(self) -> str:
        return "Pivotal bundle embeddings"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def process(self, p: Any, *args: Any) -> None:
        try:  # before the Lora extension reads files (Forge): bundled embeddings kept from its loader
            install_lora_file_filter(load_webui())
        except Exception as e:  # noqa: BLE001 - see the module docstring
            _report("preparing Forge's Lora loader", e)

    def after_extra_networks_activate(self, p: Any, *args: Any, **kwargs: Any) -> None:
        try:
            always = bool(getattr(shared.opts, OPTION, False))
            _registrar.register(load_webui(), p, webui_paths()["lora_dir"], always)
        except Exception as e:  # noqa: BLE001 - see the module docstring
            _report("registering", e)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        try:
            _registrar.unregister(load_webui(), p)
        except Exception as e:  # noqa: BLE001 - see the module docstring
            _report("unregistering", e)
