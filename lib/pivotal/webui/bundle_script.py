"""The webui script (always on, no UI) that lends bundle embeddings to generations.

Imported only by the extension's entry file inside the webui: the class must subclass the webui's
``modules.scripts.Script`` to be found there. The work is in :mod:`pivotal.webui.bundle_loader`.
"""

from __future__ import annotations

from typing import Any

from pivotal.hosts.a1111.webui import load_webui, webui_module
from pivotal.webui.bundle_loader import OPTION, BundleRegistrar
from pivotal.webui.runner import webui_paths

scripts, shared = webui_module("scripts"), webui_module("shared")  # this file is imported inside the webui only
_registrar = BundleRegistrar()


def add_settings() -> None:
    """The option in Settings > Pivotal (``on_ui_settings``)."""
    shared.opts.add_option(OPTION, shared.OptionInfo(
        False, "Make the embeddings of every bundle in the Lora folder usable in prompts without its <lora:…> tag "
               "(an embeddings-folder file of the same name always wins)", section=("pivotal", "Pivotal")))


class PivotalBundleEmbeddings(scripts.Script):
    """Registers bundle embeddings after the extra networks of a batch are active, unregisters after."""

    def title(self) -> str:
        return "Pivotal bundle embeddings"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def after_extra_networks_activate(self, p: Any, *args: Any, **kwargs: Any) -> None:
        always = bool(getattr(shared.opts, OPTION, False))
        _registrar.register(load_webui(), p, webui_paths()["lora_dir"], always)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        _registrar.unregister(load_webui(), p)
