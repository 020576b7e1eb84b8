"""What every demo model shares: SD's noise schedule and the real CLIP tokenizer files (written
once from open_clip's BPE file into Pivotal's cache folder, by
:mod:`pivotal.hosts.diffusers.clip_tokenizer`). Nothing is downloaded."""

from __future__ import annotations

import os
from typing import Any

from pivotal.hosts.diffusers.clip_tokenizer import (  # noqa: F401  (re-exported for the demo's users)
    CACHE_ENV,
    INSTALL_HINT,
    TOKENIZER_FOLDER,
    clip_tokenizer,
    default_cache_dir,
    ensure_tokenizer_files,
)

# SD's noise schedule: scaled_linear 0.00085-0.012 over 1000 steps, epsilon prediction.
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "set_alpha_to_one": False,
}

def demo_tokenizer(key: str, cache_dir: str | os.PathLike | None = None) -> Any:
    """A real ``CLIPTokenizer``; clip_g's pads with "!" (id 0) like SDXL's tokenizer_2."""
    return clip_tokenizer(key, cache_dir)
