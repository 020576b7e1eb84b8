"""The reference side of the step-time and loss-parity benchmarks: the same training written the
straightforward way, as diffusers' training examples do it (peft LoRA, textual inversion over a
resized embedding matrix, ``DDPMScheduler.add_noise``, ``compute_snr`` min-SNR weights, a plain
AdamW loop). See ``_common`` for how both sides are made to do equal work."""

from __future__ import annotations

import contextlib
import copy
import re
from typing import Any, Callable

import torch
from torch import nn

from pivotal.hosts.diffusers.host import DiffusersHost
from pivotal.training.config import TrainConfig


def share_clone(module: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """A new module tree from ``build()`` whose parameters and buffers are new Parameter / tensor
    objects over the *same storage* as ``module``'s (no copy of the weights)."""
    with torch.device("meta"):
        clone = build()
    tensors = {k: v.detach() for k, v in module.state_dict(keep_vars=True).items()}
    clone.load_state_dict(tensors, strict=True, assign=True)
    for name, buf in module.named_buffers():  # non-persistent buffers are not in the state dict
        owner, _, leaf = name.rpartition(".")
        sub = clone.get_submodule(owner) if owner else clone
        if sub._buffers.get(leaf) is not None and sub._buffers[leaf].is_meta:
            sub._buffers[leaf] = buf
    meta = [n for n, t in [*clone.named_parameters(), *clone.named_buffers()] if t.is_meta]
    assert not meta, f"share_clone left meta tensors: {meta[:5]}"
    clone.requires_grad_(False)
    return clone



def _module_names(root: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in root.named_modules()}


class ReferenceSide:
    """The same training written the straightforward way (diffusers examples + peft)."""

    name = "reference"

    def __init__(self, config: TrainConfig, host: DiffusersHost, pivotal: Any,
                 data: list[tuple[torch.Tensor, list[str], list]]) -> None:
        # ``pivotal``: _common.PivotalSide, duck-typed (_common imports this module, not the reverse)
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig, inject_adapter_in_model

        self.config = config
        self.base = host.base_model
        self.data = data
        self.gamma = config.min_snr_gamma
        sched_cfg = {k: v for k, v in host.scheduler_config.items() if not str(k).startswith("_")}
        self.scheduler = DDPMScheduler.from_config(sched_cfg)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.device = host.device
        self.steps_done = 0

        # -- models: separate module objects over the host's weight storage ------------------
        unet_cfg = dict(host.unet.config)
        self.unet = share_clone(host.unet, lambda: UNet2DConditionModel.from_config(unet_cfg))
        self.keys = host.encoder_keys()
        self.text_encoders = {k: share_clone(host._encoders[k], lambda k=k: type(host._encoders[k])(
            copy.deepcopy(host._encoders[k].config))) for k in self.keys}
        # The reference's own tokenizers (it adds tokens to them): copies of the host's.
        self.tokenizers = {k: copy.deepcopy(host.tokenizer(k)) for k in self.keys}

        # -- textual inversion, the diffusers-example way: placeholder tokens + resized matrix --
        self.placeholders: dict[str, str] = {}  # embedding name -> "<name_0> <name_1>"
        self.placeholder_ids: dict[str, list[int]] = {k: [] for k in self.keys}
        init = pivotal.embeddings.tensors()
        for spec in config.embeddings:
            tokens = [f"<{spec.name}_{i}>" for i in range(spec.vectors)]
            self.placeholders[spec.name] = " ".join(tokens)
            for k in self.keys:
                tok, te = self.tokenizers[k], self.text_encoders[k]
                added = tok.add_tokens(tokens)
                assert added == len(tokens), f"placeholder tokens {tokens} already in the vocabulary"
                ids = tok.convert_tokens_to_ids(tokens)
                te.resize_token_embeddings(len(tok), mean_resizing=False)
                with torch.no_grad():
                    te.get_input_embeddings().weight[ids] = init[spec.name][k]
                self.placeholder_ids[k] += ids
        self.orig_embeds = {k: self.text_encoders[k].get_input_embeddings().weight.detach().clone()
                            for k in self.keys}
        self.target_norms = dict(pivotal.target_norms)
        self._name_re = re.compile(r"(?<![A-Za-z0-9_-])(" + "|".join(
            re.escape(s.name) for s in sorted(config.embeddings, key=lambda s: -len(s.name))) + r")(?![A-Za-z0-9_-])",
            re.IGNORECASE)

        # -- LoRA with peft on exactly Pivotal's target modules, same rank / alpha ------------
        unet_names = _module_names(host.unet)
        unet_targets = [unet_names[id(m.host)] for m in pivotal.net.modules_of("unet")]
        self.unet.add_adapter(LoraConfig(r=config.unet_rank, lora_alpha=config.unet_alpha,
                                         init_lora_weights=True, target_modules=unet_targets))
        self._copy_lora(pivotal, "unet", self.unet, unet_targets)
        self.te_lora = config.te_lora
        if config.te_lora:
            for k, part in zip(self.keys, ("te",) if self.base == "sd1" else ("te1", "te2")):
                names = _module_names(host._encoders[k])
                targets = [names[id(m.host)] for m in pivotal.net.modules_of(part)]
                # transformers' add_adapter wants a newer peft than diffusers needs; it is a thin
                # wrapper over this call.
                inject_adapter_in_model(LoraConfig(r=config.te_rank, lora_alpha=config.te_alpha,
                                                   init_lora_weights=True, target_modules=targets),
                                        self.text_encoders[k])
                self._copy_lora(pivotal, part, self.text_encoders[k], targets)

        # -- what trains ----------------------------------------------------------------------
        self.train_embeddings = config.freeze_embeddings_at > 0
        unet_params = [p for n, p in self.unet.named_parameters() if "lora_" in n]
        te_params = [p for k in self.keys for n, p in self.text_encoders[k].named_parameters() if "lora_" in n]
        emb_params = [self.text_encoders[k].get_input_embeddings().weight for k in self.keys]
        for p in unet_params + te_params:
            p.requires_grad_(True)
        for p in emb_params:
            p.requires_grad_(self.train_embeddings)
        groups = [{"params": unet_params, "lr": config.unet_lr, "weight_decay": config.weight_decay}]
        if te_params:
            groups.append({"params": te_params, "lr": config.te_lr, "weight_decay": config.weight_decay})
        if self.train_embeddings:
            groups.append({"params": emb_params, "lr": config.embedding_lr, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
        # Mixed precision and checkpointing as the diffusers examples do them (accelerate's
        # autocast around the forward, a GradScaler for fp16; enable_gradient_checkpointing).
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16" and self.device.type == "cuda")
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if config.te_lora:
                for te in self.text_encoders.values():
                    te.gradient_checkpointing_enable()
        self.unet.train()
        for te in self.text_encoders.values():
            te.train()

    def _copy_lora(self, pivotal: Any, part: str, model: nn.Module, names: list[str]) -> None:
        with torch.no_grad():
            for m, name in zip(pivotal.net.modules_of(part), names):
                layer = model.get_submodule(name)
                layer.lora_A["default"].weight.copy_(m.algorithm.down)
                layer.lora_B["default"].weight.copy_(m.algorithm.up)

    def __enter__(self) -> "ReferenceSide":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def _caption(self, caption: str) -> str:
        return self._name_re.sub(lambda m: self.placeholders[next(
            n for n in self.placeholders if n.lower() == m.group(1).lower())], caption)

    def _encode(self, captions: list[str], sizes: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        texts = [self._caption(c) for c in captions]
        if self.base == "sd1":
            tok = self.tokenizers["clip_l"]
            ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            return self.text_encoders["clip_l"](ids.to(self.device))[0], {}
        states = []
        pooled = None
        for k in self.keys:  # as diffusers' SDXL training examples' encode_prompt
            tok = self.tokenizers[k]
            ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = self.text_encoders[k](ids.to(self.device), output_hidden_states=True)
            pooled = out[0]
            states.append(out.hidden_states[-2])
        time_ids = torch.tensor([[*s.original, *s.crop_top_left, *s.target] for s in sizes], dtype=torch.float32)
        return torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids.to(self.device)}

    def step(self) -> float:
        from diffusers.training_utils import compute_snr

        cfg = self.config
        latents, captions, sizes = self.data[self.steps_done]
        bsz = latents.shape[0]
        # Same draws, same order as Pivotal (timesteps, then noise), from a generator with its seed.
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (bsz,), generator=self.generator)
        noise = torch.randn(latents.shape, generator=self.generator)
        timesteps, noise = timesteps.to(self.device), noise.to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        autocast = (torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            context, added = self._encode(captions, sizes)
            kwargs = {"added_cond_kwargs": added} if added else {}
            pred = self.unet(noisy, timesteps, context, **kwargs).sample
        target = noise
        snr = compute_snr(self.scheduler, timesteps)
        weights = torch.stack([snr, self.gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
        loss = nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
        loss = (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.train_embeddings:
            with torch.no_grad():
                for k in self.keys:
                    weight = self.text_encoders[k].get_input_embeddings().weight
                    # Let only the placeholder rows change, as the textual-inversion example does.
                    keep = torch.ones(weight.shape[0], dtype=torch.bool)
                    keep[self.placeholder_ids[k]] = False
                    weight[keep] = self.orig_embeds[k][keep]
                    # Pivotal's norm pull on the new vectors (same formula, same strength).
                    rows = weight[self.placeholder_ids[k]]
                    norms = rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    weight[self.placeholder_ids[k]] = rows * (self.target_norms[k] / norms) ** cfg.embedding_norm_pull
        self.steps_done += 1
        return float(loss.detach())


