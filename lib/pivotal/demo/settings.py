"""The built-in demo's training settings, shared by ``pivotal train --demo``, ``pivotal queue
--demo`` and ``pivotal app --demo`` (the textcraftor mode's are :data:`pivotal.demo.reward.DEMO_TEXTCRAFTOR`)."""

from __future__ import annotations

from typing import Any

#: Settings of the built-in demo (tiny random model, 64 px synthetic data). Nothing to preserve and
#: few steps, so LRs well above the real defaults (and conv layers too) make the loss visibly fall
#: within a minute on a CPU. Shared by ``pivotal train --demo`` and ``pivotal app --demo``. 300 steps:
#: on the tiny-world model v2 (timesteps leaning to noise) 150 left the held-out character in half the
#: pictures on new backgrounds; 300 puts it in 88-100 % (2 seeds; 150 sufficed on v1).
DEMO_SETTINGS: dict[str, Any] = {"resolution": 64, "bucket_step": 16, "steps": 300, "unet_lr": 2e-3,
                                 "embedding_lr": 1e-2, "lora_preset": "attn-mlp-conv"}
#: 4 vectors: on v2, with 2 the UNet LoRA took the character and the embedding alone drew it in 1-3
#: of the ablation grid's 4 rows (often its purple as the background); with 4, 3-4 of 4 (4 seeds).
DEMO_EMBEDDING = "mychar:4:person"
