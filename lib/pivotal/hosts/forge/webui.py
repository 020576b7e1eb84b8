"""The Forge webui modules the Forge host and the webui glue use, imported only when needed.

Forge (lllyasviel/stable-diffusion-webui-forge, the 2024 "backend" rewrite) keeps A1111's shell
(``modules.shared``, ``processing``, ``call_queue``, ``progress``, script callbacks) over its own
backend: the loaded model is a ``ForgeDiffusionEngine`` whose parts live in ``sd_model.forge_objects``,
and prompt embeddings live in one database per text-processing engine
(``sd_model.text_processing_engine``; SDXL ``text_processing_engine_l`` / ``_g``) instead of
``sd_hijack.model_hijack.embedding_db``. :class:`ForgeWebui` gathers what Pivotal needs and offers
the A1111 handle's attributes the webui glue reads (``shared``, ``processing``, ``call_queue``,
``networks``, ``embedding_db``, ``textual_inversion``), so the glue works unchanged on either.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

from pivotal.errors import ModelLayoutError
from pivotal.hosts.a1111.webui import LORA_MODULE, optional_module, optional_webui_module, webui_module

#: the text-processing engines a Forge model may carry, and the text encoder each reads
ENGINE_ATTRS = {"text_processing_engine": "clip_l", "text_processing_engine_l": "clip_l",
                "text_processing_engine_g": "clip_g"}


@dataclass
class ForgeWebui:
    """Handles on Forge's modules (``networks``: the built-in Lora extension's loader, or None)."""

    shared: Any
    processing: Any
    sd_models: Any
    memory_management: Any
    textual_inversion: Any  # backend.text_processing.textual_inversion (Embedding, create_embedding_from_data)
    classic_engine: Any
    emphasis: Any
    operations: Any  # backend.operations (ForgeOperations, weights_manual_cast)
    networks: Optional[Any] = None
    call_queue: Optional[Any] = None
    kind: str = "forge"

    @property
    def sd_model(self) -> Any:
        """The loaded model; ModelLayoutError while none is (Forge loads on the first generation,
        :func:`load_model_now` loads it)."""
        model = self.sd_models.model_data.sd_model
        if model is None or getattr(model, "forge_objects", None) is None:
            raise ModelLayoutError("Forge has not loaded a model yet (it loads on the first generation); "
                                   "generate once or start a training run, which loads it")
        return model

    def model_pending(self) -> bool:
        """Whether Forge would load another model at the next generation (a checkpoint, VAE or
        storage-dtype change is applied lazily)."""
        data = self.sd_models.model_data
        return data.forge_hash != str(data.forge_loading_parameters)

    def engines(self, sd_model: Any = None) -> dict[str, Any]:
        """{attribute name: text-processing engine} of the model, in ENGINE_ATTRS order."""
        model = self.sd_model if sd_model is None else sd_model
        return {a: getattr(model, a) for a in ENGINE_ATTRS if getattr(model, a, None) is not None}

    @property
    def embedding_db(self) -> "EngineDatabases":
        """The engines' databases behind the A1111 database interface (see :class:`EngineDatabases`)."""
        return EngineDatabases([e.embeddings for e in self.engines().values()])


class EngineDatabases:
    """Forge's per-engine embedding databases as one A1111-style database: reads come from the
    first engine's (an SDXL embedding is registered in both with the same object), registering
    and unregistering go to every engine (Forge's ``register_embedding_by_name(embedding, name)``
    takes no model)."""

    def __init__(self, databases: list[Any]) -> None:
        if not databases:
            raise ModelLayoutError("the loaded Forge model has no text-processing engine with embeddings")
        self.databases = databases
        first = databases[0]
        self.word_embeddings = first.word_embeddings
        self.skipped_embeddings = first.skipped_embeddings
        self.ids_lookup = first.ids_lookup
        self.expected_shape = first.expected_shape

    def register_embedding_by_name(self, embedding: Any, _model: Any, name: str) -> None:
        for db in self.databases:
            db.register_embedding_by_name(embedding, name)


def load_forge_webui() -> ForgeWebui:
    """Forge's modules. ModelLayoutError outside Forge."""
    backend = optional_module("backend.memory_management")
    if backend is None:
        raise ModelLayoutError("not running inside Forge (no backend.memory_management)")
    networks = sys.modules.get(LORA_MODULE)
    if networks is not None and not hasattr(networks, "load_networks"):
        networks = None
    return ForgeWebui(shared=webui_module("shared"), processing=webui_module("processing"),
                      sd_models=webui_module("sd_models"), memory_management=backend,
                      textual_inversion=optional_module("backend.text_processing.textual_inversion"),
                      classic_engine=optional_module("backend.text_processing.classic_engine"),
                      emphasis=optional_module("backend.text_processing.emphasis"),
                      operations=optional_module("backend.operations"),
                      networks=networks, call_queue=optional_webui_module("call_queue"))


def load_model_now(webui: ForgeWebui) -> Any:
    """The model Forge's options name, loaded now if it is not yet (as the next generation would),
    while holding the webui's queue so no generation runs meanwhile."""
    lock = getattr(webui.call_queue, "queue_lock", None)
    if lock is None:
        webui.sd_models.forge_model_reload()
    else:
        with lock:
            webui.sd_models.forge_model_reload()
    return webui.sd_model
