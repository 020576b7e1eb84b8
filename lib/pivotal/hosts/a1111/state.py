"""What the A1111 (or reForge) model looks like now, for ``GET /pivotal/v1/host``: a training run
must leave every entry as it found it. Hashing the weights takes seconds on big models."""

from __future__ import annotations

from typing import Any

from pivotal.hosts.a1111.session import module_flags, weights_fingerprint
from pivotal.hosts.a1111.webui import Webui


def host_state(webui: Webui) -> dict[str, Any]:
    """Weights fingerprint, flags, attention optimization and the embedding database."""
    model = webui.sd_model
    grads, training, forwards = module_flags(model)
    optimizer = getattr(webui.sd_hijack, "current_optimizer", None)
    db = webui.embedding_db
    return {"weights": weights_fingerprint(model), "requires_grad": grads, "training_modules": training,
            "instance_forwards": forwards, "attention": getattr(optimizer, "name", "") or "",
            "embeddings": sorted(db.word_embeddings), "ids_lookup": len(db.ids_lookup),
            "checkpoint": str(getattr(getattr(model, "sd_checkpoint_info", None), "title", ""))}
