"""The tiny-world reward: a small differentiable scorer of whether a picture shows its prompt's
background colour, object colour, shape and place, for the textcraftor mode on the demo model.

:class:`WorldScorer` is a 4-layer CNN (about 38 k weights) with one classification head per
attribute, trained on rendered pictures of :mod:`pivotal.demo.world` (by
:mod:`pivotal.demo.reward_train`, ``tools/train_world_reward.py``). The reward of a picture is the
sum over the four attributes of the log-probability the scorer gives the prompt's value: 0 when
it is sure the picture shows all four, very negative when it shows something else.

The weights ship (``weights/tiny-world-reward.safetensors``, ~80 KB in fp16): training them takes
minutes, which every user's first run would pay and a cache folder would have to keep, and a
shipped file makes the reward the same on every machine. The script rebuilds it bit for bit on
one thread. It is a different judge from :func:`pivotal.demo.world_read.read_picture` (a learnt
classifier on renders, not hand rules), which stays the measure: a run is scored by the reader,
not by the reward it trained on.

Registered under the name ``tiny_world`` by :func:`register` (called when a demo host is built).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pivotal.demo.world import BASE_SHAPES, COLOURS, PLACES
from pivotal.errors import BundleError, ConfigError

REWARD_FILE = Path(__file__).resolve().parent / "weights" / "tiny-world-reward.safetensors"
METADATA_KEY = "pivotal.world_reward"
NAME = "tiny_world"
SIZE = 64
#: the attributes, each with its classes in a fixed order (the heads' output order)
CLASSES: dict[str, tuple[str, ...]] = {
    "background": tuple(COLOURS), "colour": tuple(COLOURS), "shape": BASE_SHAPES, "place": tuple(PLACES),
}
#: the ``pivotal train --demo sd1 --mode textcraftor`` settings, where nothing else spoke (bench/textcraftor.py)
DEMO_TEXTCRAFTOR: dict[str, Any] = {"reward": [NAME], "te_lr": 1e-3, "textcraftor_sample_steps": 10,
                                    "textcraftor_grad_steps": 3, "textcraftor_guidance": 4.0, "steps": 100,
                                    "batch_size": 4}
#: world seed of the demo's training prompts (not the seed of the checks' prompts)
PROMPT_SEED = 7
_ONE_OBJECT = re.compile(r"^an? (?P<colour>\w+) (?P<shape>\w+) on an? (?P<background>\w+) background, "
                         r"(?P<place>[\w ]+)$")


class WorldScorer(nn.Module):
    """Pictures (B, 3, H, W) in [0, 1] (resized to 64 px) -> {attribute: (B, classes) logits}.

    Strided convolutions down to an 8 x 8 map, flattened (so place survives), one hidden layer,
    one linear head per attribute; SiLU everywhere, so the reward's gradient is smooth."""

    def __init__(self, width: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(width * 8 * 8, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in CLASSES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float()
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        h = self.features(x * 2 - 1)
        return {k: head(h) for k, head in self.heads.items()}


def prompt_labels(prompt: str) -> dict[str, int]:
    """{attribute: class index} of a one-object world caption ("a red circle on a blue background,
    top left"); ConfigError naming ``reward_prompts`` for any other prompt."""
    m = _ONE_OBJECT.match(prompt.strip())
    if m is None or any(m.group(k) not in v for k, v in CLASSES.items()):
        raise ConfigError(f"reward_prompts: the {NAME} reward reads one-object world captions such as 'a red circle "
                          f"on a blue background, top left' (colours {', '.join(COLOURS)}; shapes "
                          f"{', '.join(BASE_SHAPES)}; places {', '.join(PLACES)}), got {prompt!r}")
    return {k: CLASSES[k].index(m.group(k)) for k in CLASSES}


def demo_prompts(count: int = 64, seed: int = PROMPT_SEED) -> list[str]:
    """``count`` one-object world captions (distinct scenes drawn from ``seed``)."""
    from pivotal.demo.world import BASE_WORLD, caption, sample_scene

    rng = random.Random(f"pivotal-reward-prompts:{seed}")
    return [caption(sample_scene(rng, BASE_WORLD, objects=1)) for _ in range(count)]


def load_scorer(path: str | Path = REWARD_FILE) -> WorldScorer:
    """The shipped scorer, fp32, eval, frozen; BundleError naming the file when it is missing."""
    from pivotal.formats.safetensors_io import load_tensors, read_header

    p = Path(path)
    if not p.is_file():
        raise BundleError(p, "the tiny-world reward's weights are missing; rebuild them with "
                             "python tools/train_world_reward.py")
    header = read_header(p)
    meta = json.loads(header.metadata.get(METADATA_KEY, "{}"))
    model = WorldScorer(int(meta.get("width", 16)), int(meta.get("hidden", 32)))
    model.load_state_dict({k: v.float() for k, v in load_tensors(header).items()})
    return model.eval().requires_grad_(False)


class TinyWorldReward:
    """Sum over background, colour, shape and place of log p(the prompt's value | picture)."""

    name = NAME

    def __init__(self, scorer: WorldScorer) -> None:
        self.scorer = scorer

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        logits = self.scorer(images)
        labels = [prompt_labels(p) for p in prompts]
        total = torch.zeros(images.shape[0], device=images.device)
        for k, out in logits.items():
            target = torch.tensor([lab[k] for lab in labels], device=out.device)
            total = total + out.float().log_softmax(-1).gather(1, target[:, None])[:, 0]
        return total


def tiny_world_reward(config: Any, device: torch.device) -> TinyWorldReward:
    """The registry's factory: the shipped scorer on ``device``; every training prompt is checked to
    be a one-object world caption now, before anything trains."""
    from pivotal.training.textcraftor import read_prompts

    for prompt in read_prompts(config):
        prompt_labels(prompt)
    return TinyWorldReward(load_scorer().to(device))


def register() -> None:
    """Make ``tiny_world`` usable in the ``reward`` setting (idempotent)."""
    from pivotal.training.rewards import register_reward

    register_reward(NAME, tiny_world_reward)
