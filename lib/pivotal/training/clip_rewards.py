"""The built-in rewards on local weight files: CLIP score and an aesthetic predictor.

* ``clip``: cosine similarity of CLIP's image and text embeddings (the image-text alignment
  reward of TextCraftor), from a transformers ``CLIPModel`` folder (``config.json``, the weights,
  the tokenizer files) named by the ``reward_clip_model`` setting;
* ``aesthetic``: a LAION-style aesthetic head on CLIP's L2-normalised image embedding, from the
  ``.safetensors`` named by ``reward_aesthetic_file``: either one linear layer (``weight`` (1, D),
  ``bias``; the "linear" predictors) or a chain ``layers.N.weight`` / ``layers.N.bias`` applied in
  index order with nothing between the layers (the improved-aesthetic-predictor MLP, whose dropouts
  are inactive at inference and which has no activations). It needs ``reward_clip_model`` too
  (the CLIP the head was trained on, ViT-L/14 for LAION's).

Only local files are read (``local_files_only``; pickle files are refused, as everywhere in
Pivotal); a missing or unreadable file is a ConfigError naming the setting to fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from pivotal.errors import ConfigError

#: OpenAI CLIP's pixel normalisation (used when the folder has no preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipParts:
    """A frozen CLIP model, its tokenizer and its pixel normalisation, on ``device``."""

    def __init__(self, folder: str, device: torch.device) -> None:
        path = Path(folder) if folder else None
        if path is None or not path.is_dir():
            raise ConfigError(f"reward_clip_model: {folder!r} is not a folder; set it to a local transformers CLIP "
                              "model folder (config.json, model.safetensors, tokenizer files); nothing is downloaded")
        try:
            from transformers import CLIPModel, CLIPTokenizer

            # Any: transformers' own types do not follow the config's nested fields
            model: Any = CLIPModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
            self.tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"reward_clip_model: cannot load a CLIP model from {path}: {e}".splitlines()[0]
                              + " (needs config.json, model.safetensors and the tokenizer files)") from e
        self.model: Any = model.to(device).eval().requires_grad_(False)
        self.device = device
        self.size = int(self.model.config.vision_config.image_size)
        mean, std = CLIP_MEAN, CLIP_STD
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text(encoding="utf-8"))
            mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
        self.mean = torch.tensor(mean, device=device).reshape(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).reshape(1, 3, 1, 1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, P) L2-normalised image embeddings of images (B, 3, H, W) in [0, 1], differentiable."""
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        out = self.model.get_image_features(pixel_values=(x - self.mean) / self.std)
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(feats.float(), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, P) L2-normalised text embeddings (prompts cut at CLIP's 77 tokens)."""
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                               attention_mask=tok.attention_mask.to(self.device))
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(feats.float(), dim=-1)


_LOADED: dict[tuple[str, str], ClipParts] = {}


def _clip(config: Any, device: torch.device) -> ClipParts:
    """One loaded CLIP per (folder, device) for the run's rewards (clip and aesthetic share it)."""
    key = (str(config.reward_clip_model), str(device))
    if key not in _LOADED:
        _LOADED.clear()  # one model at a time: they are large
        _LOADED[key] = ClipParts(config.reward_clip_model, device)
    return _LOADED[key]


class ClipScore:
    """CLIP score: cos(image embedding, prompt embedding) per image, in [-1, 1]."""

    name = "clip"

    def __init__(self, clip: ClipParts) -> None:
        self.clip = clip

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (self.clip.image_features(images) * self.clip.text_features(prompts)).sum(dim=-1)


class AestheticScore:
    """The aesthetic head's score of each image (the prompt is not used)."""

    name = "aesthetic"

    def __init__(self, clip: ClipParts, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.clip = clip
        self.layers = layers

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        x = self.clip.image_features(images)
        for weight, bias in self.layers:
            x = F.linear(x, weight, bias)
        return x[:, 0]


def read_aesthetic_head(file: str, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (weight, bias) chain of an aesthetic head file taking ``width``-wide embeddings;
    ConfigError naming ``reward_aesthetic_file`` when it is missing, a pickle, or does not fit."""
    path = Path(file) if file else None
    if path is None or not path.is_file():
        raise ConfigError(f"reward_aesthetic_file: {file!r} is not a file; set it to a local .safetensors aesthetic "
                          "head (nothing is downloaded)")
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"reward_aesthetic_file: {path} is not a .safetensors file (pickle files can run code; "
                          "convert a trusted one with safetensors' save_file)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"reward_aesthetic_file: cannot read {path}: {e}") from e
    if "weight" in tensors:
        pairs = [("weight", "bias")]
    else:
        idx = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("layers.") and k.endswith(".weight"))
        pairs = [(f"layers.{i}.weight", f"layers.{i}.bias") for i in idx]
    layers = []
    expect = width
    for wk, bk in pairs:
        w = tensors[wk].float()
        b = tensors.get(bk, torch.zeros(w.shape[0])).float()
        if w.dim() != 2 or w.shape[1] != expect or b.shape != (w.shape[0],):
            raise ConfigError(f"reward_aesthetic_file: {path}: {wk} has shape {tuple(w.shape)}, expected (N, {expect}) "
                              "(a head for another CLIP than reward_clip_model?)")
        layers.append((w, b))
        expect = w.shape[0]
    if not layers or expect != 1:
        raise ConfigError(f"reward_aesthetic_file: {path} holds no linear chain ending in one score "
                          "(keys weight/bias or layers.N.weight/bias)")
    return layers


def clip_reward(config: Any, device: torch.device) -> ClipScore:
    return ClipScore(_clip(config, device))


def aesthetic_reward(config: Any, device: torch.device) -> AestheticScore:
    if not config.reward_aesthetic_file:
        raise ConfigError("reward_aesthetic_file: the aesthetic reward needs a head file (.safetensors); set it")
    clip = _clip(config, device)
    width = int(clip.model.config.projection_dim)
    layers = [(w.to(device), b.to(device)) for w, b in read_aesthetic_head(config.reward_aesthetic_file, width)]
    return AestheticScore(clip, layers)
