"""One optimizer step: gradient accumulation over micro-batches, mixed precision, the
non-finite guard, gradient clipping, and the update.

The loss of each sample is weighted by min-SNR, its image's loss weight (``loss_scale.txt``) and,
with ``masked_loss``, its mask; the schedule is the host's, rescaled to zero terminal SNR when
``zero_terminal_snr`` is on (the validation loss uses the same :attr:`StepRunner.alphas`)."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterator, Sequence

import torch

from pivotal.adapters.network import LoraNetwork
from pivotal.errors import ConfigError
from pivotal.host_api import Conditioning, SizeInfo, TrainingHost
from pivotal.text.embeddings import EmbeddingSet
from pivotal.training.batches import Batches, BatchSource
from pivotal.training.config import TrainConfig
from pivotal.training.distributed import DataParallel
from pivotal.training.dreamartist import guided_prediction, negative_captions, negative_pairs
from pivotal.training.losses import (
    add_noise,
    diffusion_loss,
    min_snr_weights,
    sample_noise,
    sample_timesteps,
    training_target,
    zero_terminal_snr,
)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Bytes of prompt conditioning kept while the text side is frozen (SD1: ~240 KB per caption in
#: fp32, SDXL ~640 KB): a typical dataset's captions fit; a larger one evicts the oldest.
TEXT_CACHE_BYTES = 128 * 2**20


@contextlib.contextmanager
def step_random_state(seed: int, step: int, device: torch.device, needed: bool) -> Iterator[None]:
    """Give one training step its own global random state, seeded from (seed, step), when the
    step draws from it (LoRA dropout does: nn.functional.dropout has no generator argument).

    Why: the global generator belongs to the host (a webui seeds its own generations from it), and a
    state that depends only on the step keeps an interrupted-then-resumed run equal to an
    uninterrupted one. The host's state is restored on the way out (fork_rng)."""
    if not needed:
        yield
        return
    state = (seed * 1_000_003 + step) % 2**63  # one distinct stream per step of this run
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(state)
        if cuda:  # this device only: fork_rng restores only the devices it was given
            with torch.cuda.device(device):
                torch.cuda.manual_seed(state)
        yield


def _grad_scaler(enabled: bool):
    """A CUDA GradScaler for fp16 (torch >= 2.3 spells it torch.amp, the webui's 2.1 torch.cuda.amp)."""
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def training_prediction(config: TrainConfig, host: TrainingHost) -> str:
    """What the UNet is trained to predict ("epsilon" or "v_prediction"): the setting, or the
    model's own for "auto". ConfigError when zero_terminal_snr is on and that is not v-prediction."""
    prediction = config.prediction_type if config.prediction_type != "auto" else host.prediction_type
    if config.zero_terminal_snr and prediction != "v_prediction":
        raise ConfigError(f"zero_terminal_snr: needs v-prediction, but prediction_type {config.prediction_type!r} "
                          f"means {prediction!r} for {host.label}; set prediction_type to v_prediction (the model "
                          "learns to predict v) or zero_terminal_snr to false")
    return prediction


class StepRunner:
    """Computes the loss of one optimizer step and applies the update (or refuses to)."""

    def __init__(self, config: TrainConfig, host: TrainingHost, net: LoraNetwork, embeddings: EmbeddingSet,
                 batches: BatchSource, generator: torch.Generator, parallel: DataParallel | None = None,
                 class_batches: Batches | None = None) -> None:
        self.config = config
        #: prior preservation's class images (None: off); their loss is added × prior_loss_weight
        self.class_batches = class_batches
        #: DreamArtist++: {positive name: negative name} (empty: off), see pivotal.training.dreamartist
        self.negatives = negative_pairs(config)
        self.parallel = parallel
        self.host = host
        self.net = net
        self.embeddings = embeddings
        self.batches = batches
        self.generator = generator
        self.alphas = host.alphas_cumprod().float().to(host.device)
        self.prediction = training_prediction(config, host)
        if config.zero_terminal_snr:
            self.alphas = zero_terminal_snr(self.alphas)
        #: the total gradient norm of the last update, before clipping (None: clipping is off)
        self.grad_norm: float | None = None
        self.device = host.device
        autocast_dtype = AUTOCAST_DTYPES.get(config.precision)
        self.autocast_dtype = autocast_dtype
        # fp16 gradients underflow without loss scaling; bf16 and fp32 do not need it.
        self.scaler = _grad_scaler(config.precision == "fp16" and self.device.type == "cuda")
        # Everything that could change the prompt conditioning between steps: the embedding
        # vectors and the text-encoder LoRA. While none of it trains (the "lora_only" phase, or
        # frozen embeddings), a caption's conditioning is the same every step and is computed once.
        text_lora = [m for m in net.modules_of() if m.part != "unet"]
        self._text_params = [p for m in text_lora for p in m.parameters()] + list(embeddings.parameters())
        self._text_cacheable = host.text_encoding_is_deterministic() and not any(m.dropout for m in text_lora)
        self._text_cache: OrderedDict[tuple, Conditioning] = OrderedDict()
        self._text_cache_bytes = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """The training autocast (bf16/fp16 precision), or a no-op context."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _text_frozen(self) -> bool:
        return self._text_cacheable and not any(p.requires_grad for p in self._text_params)

    def _encode(self, captions: list[str], sizes: Sequence[SizeInfo]) -> Conditioning:
        """The host's conditioning for the batch; from the per-caption cache while the text side is
        frozen (each caption encoded alone, so a value never depends on its batch-mates, and a
        resumed run gets the same bits)."""
        if not self._text_frozen():
            if self._text_cache:
                self._text_cache.clear()
                self._text_cache_bytes = 0
            return self.host.encode_prompts(captions, self.embeddings, sizes)
        versions = (tuple(p._version for p in self._text_params), self.host.text_encoding_key())  # once per batch
        rows = []
        for caption, size in zip(captions, sizes):
            key = (caption, (size.original, size.crop_top_left, size.target), versions)
            cond = self._text_cache.get(key)
            if cond is None:
                with torch.no_grad():
                    cond = self.host.encode_prompts([caption], self.embeddings, [size])
                self._remember(key, cond)
            else:
                self._text_cache.move_to_end(key)
            rows.append(cond)
        if len(rows) == 1:
            return Conditioning(rows[0].context, dict(rows[0].extra))
        return Conditioning(torch.cat([c.context for c in rows]),
                            {k: torch.cat([c.extra[k] for c in rows]) for k in rows[0].extra})

    def _remember(self, key: tuple, cond: Conditioning) -> None:
        size = sum(t.numel() * t.element_size() for t in (cond.context, *cond.extra.values()))
        if size > TEXT_CACHE_BYTES:
            return
        while self._text_cache and self._text_cache_bytes + size > TEXT_CACHE_BYTES:
            _, old = self._text_cache.popitem(last=False)
            self._text_cache_bytes -= sum(t.numel() * t.element_size() for t in (old.context, *old.extra.values()))
        self._text_cache[key] = cond
        self._text_cache_bytes += size

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, captions: list[str], sizes: Sequence[SizeInfo],
                guided: bool = True) -> torch.Tensor:
        """The prediction the loss compares with the target, (B, C, h, w), for noisy latents (B, C, h, w)
        and timesteps (B,): the UNet's output on the captions, or with DreamArtist++ (and ``guided``)
        the guided one, uncond(captions with the negative names) + cfg · (cond − uncond), from one
        UNet pass over the 2B rows. Runs under the caller's autocast."""
        dtype = self.host.dtype
        if not (guided and self.negatives):
            return self.host.predict(noisy.to(dtype), t, self._encode(list(captions), sizes))
        rows = negative_captions(captions, self.negatives) + list(captions)
        cond = self._encode(rows, list(sizes) * 2)
        both = self.host.predict(torch.cat([noisy, noisy]).to(dtype), torch.cat([t, t]), cond)
        uncond, text = both.float().chunk(2)
        return guided_prediction(uncond, text, self.config.dreamartist_cfg)

    def _micro_loss(self, source: Batches, index: int, guided: bool, finite: bool) -> torch.Tensor | None:
        """The loss of micro-step ``index`` of ``source`` (this process's share of it in data-parallel
        runs); None when this process has no sample or an earlier micro-step was non-finite (the
        random draws are made all the same, so every process keeps the same stream)."""
        cfg = self.config
        dp = self.parallel
        if dp is None:
            latents, captions, sizes = source.get(index)  # on the device
            count, part, shape = latents.shape[0], slice(None), tuple(latents.shape)
        else:
            latents, captions, sizes, count, part = source.get_shard(index, dp.shard)
            # rank 0 always has a sample: every process learns the latent shape for the noise
            mine = list(latents.shape[1:]) if latents.dim() == 4 else [0, 0, 0]
            shape = (count, *dp.largest(mine))
        # The random draws come from the CPU generator (same stream on any device, exact resume;
        # every process draws the global batch's): only they cross to the device, the latents
        # stay where they are.
        t_cpu = sample_timesteps(count, self.alphas.shape[0], self.generator)[part]
        noise_cpu = sample_noise(torch.Size(shape), self.generator, cfg.noise_offset)[part]
        if t_cpu.shape[0] == 0 or not finite:
            return None  # a process with no sample still draws, to keep the random streams equal
        noise, t = noise_cpu.to(self.device), t_cpu.to(self.device)
        noisy = add_noise(latents, noise, t, self.alphas)
        target = training_target(self.prediction, latents, noise, t, self.alphas)
        image_weights, mask = source.loss_weights(index, (shape[-2], shape[-1]), part)
        weights = min_snr_weights(t_cpu, self.alphas, cfg.min_snr_gamma, self.prediction) * image_weights
        with self.autocast():
            pred = self.predict(noisy, t, captions, sizes, guided)
        loss = diffusion_loss(pred, target, weights, mask)
        if dp is not None:
            loss = loss * (t_cpu.shape[0] / count)  # this shard's share of the global batch mean
        return loss

    def run(self, step: int, optimizer: torch.optim.Optimizer) -> float | None:
        """Loss of optimizer step ``step`` (mean over accumulated micro-batches) after applying the
        update; None when the loss was NaN/inf, in which case nothing was updated.

        Data-parallel (``parallel``): every process draws the global batch's timesteps and noise,
        trains its shard, and the gradients and losses are summed over the processes (see
        :mod:`pivotal.training.distributed`); the result is the single-process step's.
        """
        cfg = self.config
        dp = self.parallel
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        finite = True
        # Prior preservation (diffusers' train_dreambooth): each micro-step trains B instance images
        # and B class images; loss = instance loss + prior_loss_weight × class loss. The two halves
        # run as two passes (their buckets may differ), each backward on its own (same gradients
        # as one sum, half the activations kept).
        sources: list[tuple[Batches, float, bool]] = [(self.batches, 1.0, True)]
        if self.class_batches is not None:
            sources.append((self.class_batches, cfg.prior_loss_weight, False))
        for k in range(cfg.grad_accum):
            index = step * cfg.grad_accum + k
            for source, weight, guided in sources:
                loss = self._micro_loss(source, index, guided, finite)
                if loss is None:
                    continue
                loss = loss * (weight / cfg.grad_accum)
                if not torch.isfinite(loss):
                    finite = False
                    continue
                self.scaler.scale(loss).backward()
                total += float(loss.detach())
            if not finite and dp is None:
                break
        if dp is not None:
            finite = not dp.any(not finite)
        if not finite:
            # Nothing reaches the weights: the gradients of this step are dropped whole.
            optimizer.zero_grad(set_to_none=True)
            return None
        if dp is not None:
            dp.sum_gradients(p for group in optimizer.param_groups for p in group["params"])
            total = dp.total(total)
        if cfg.max_grad_norm > 0:
            self.grad_norm = clip_gradients(self.scaler, optimizer, cfg.max_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        return total


def clip_gradients(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """Clip the summed gradients of every trained tensor (LoRA and embeddings together, as kohya
    and diffusers do) to total norm ``max_norm``; return the norm before clipping. fp16: the
    GradScaler unscales first (its step then does not unscale again), so the limit applies to
    the true gradients; an overflowed step (inf norm) is still skipped by the scaler."""
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
