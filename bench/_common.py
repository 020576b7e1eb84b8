"""Shared pieces of the benchmarks: models, the two trainers being compared, timing and reporting.

Two sides train the same thing from the same starting point:

* ``PivotalSide``: Pivotal's own trainer pieces (``BatchSource``, ``StepRunner``, ``apply_lrs``,
  ``pull_norms``) over a ``DiffusersHost``, inside the host's training session with the LoRA
  attached: the body of ``pivotal.training.trainer._Run._loop`` without progress events and saves.
* ``ReferenceSide``: the same work written the straightforward way, as diffusers' training
  examples do it: a diffusers ``UNet2DConditionModel`` + peft LoRA (``add_adapter`` with a
  ``LoraConfig`` naming exactly Pivotal's target modules, same rank / alpha), text-encoder LoRA the
  same way, textual inversion by adding placeholder tokens to the tokenizer, resizing the token
  embedding and training the whole embedding matrix (rows of other tokens restored after every
  optimizer step), ``DDPMScheduler.add_noise``, ``diffusers.training_utils.compute_snr`` min-SNR
  weighting, and a plain ``torch.optim.AdamW`` loop.

The reference's modules are separate module objects whose frozen weights *share storage* with
the host's (built on the meta device, then given the host's tensors), so both read the same
memory and the process holds one copy of the base model. LoRA / embedding initial values are
copied from Pivotal's into the reference, and both draw timesteps and noise from a generator with
the same seed in the same order, so their losses agree step by step (see ``loss_parity.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))

import torch  # noqa: E402

# The scripts import everything from here; these live in their own files to keep each small.
from _arch import sd15_parts, sdxl_parts  # noqa: E402
from _reference import ReferenceSide, share_clone  # noqa: E402,F401
from _report import (  # noqa: E402,F401
    THREADS_ENV,
    add_threads_arg,
    apply_threads,
    cuda_peak_mib,
    cuda_peak_reset,
    load_average,
    machine_info,
    print_table,
    quantiles,
    resolve_threads,
    rss_mib,
    write_json,
)
from pivotal.demo.data import make_demo_dataset  # noqa: E402
from pivotal.demo.model import build_demo_parts  # noqa: E402
from pivotal.hosts.diffusers.host import DiffusersHost  # noqa: E402
from pivotal.hosts.diffusers.parts import PipelineParts  # noqa: E402
from pivotal.training.batches import BatchSource  # noqa: E402
from pivotal.training.config import EmbeddingSpec, TrainConfig  # noqa: E402
from pivotal.training.optim import apply_lrs, build_optimizer, pull_norms  # noqa: E402
from pivotal.training.step import StepRunner  # noqa: E402
from pivotal.training.trainer import _Run  # noqa: E402

#: The two embeddings of the "pivotal" cases: (name, vectors, init text).
EMBEDDINGS = (("mychar", 2, "woman"), ("mystyle", 2, "painting"))
CASES = ("unet_lora", "pivotal", "pivotal_te_lora")
CASE_LABELS = {"unet_lora": "UNet LoRA only", "pivotal": "pivotal (UNet LoRA + 2 emb)",
               "pivotal_te_lora": "pivotal + TE LoRA"}


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    key: str           # "sd1-tiny", "sdxl-tiny", "sd15-arch"
    base: str          # "sd1" / "sdxl"
    resolution: int    # training resolution (pixels)
    batch_size: int
    label: str


MODELS: dict[str, ModelSpec] = {
    "sd1-tiny": ModelSpec("sd1-tiny", "sd1", 64, 2, "tiny SD1 (demo), 64 px, batch 2"),
    "sdxl-tiny": ModelSpec("sdxl-tiny", "sdxl", 64, 2, "tiny SDXL (demo), 64 px, batch 2"),
    "sd15-arch": ModelSpec("sd15-arch", "sd1", 256, 1, "SD1.5 architecture (random), 256 px, batch 1"),
    # GPU only (step_time.py adds them when CUDA is available): SD's native sizes
    "sd15-arch-512": ModelSpec("sd15-arch-512", "sd1", 512, 1, "SD1.5 architecture (random), 512 px, batch 1"),
    "sdxl-arch-1024": ModelSpec("sdxl-arch-1024", "sdxl", 1024, 1, "SDXL architecture (random), 1024 px, batch 1"),
}
GPU_MODELS = ("sd15-arch-512", "sdxl-arch-1024")


def build_parts(spec: ModelSpec, seed: int = 0, device: str = "cpu") -> PipelineParts:
    if spec.key.startswith("sd15-arch"):
        return sd15_parts(seed)
    if spec.key.startswith("sdxl-arch"):
        return sdxl_parts(seed, device)  # built where it runs: 10 GB of fp32 UNet
    return build_demo_parts(spec.base, seed)


def build_host(spec: ModelSpec, seed: int = 0, device: str | None = None) -> DiffusersHost:
    """The host for ``spec`` on ``device`` (default: CUDA when available, else CPU), fp32."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parts = build_parts(spec, seed, str(dev))
    for m in (parts.unet, parts.vae, *parts.text_encoders.values()):
        m.to(dev)
    return DiffusersHost(parts, label=spec.label)


# ---------------------------------------------------------------------------------------------
# configuration of a case
# ---------------------------------------------------------------------------------------------
def make_config(spec: ModelSpec, case: str, data_dir: str, out_dir: str, seed: int = 0,
                **overrides: Any) -> TrainConfig:
    """Pivotal's settings for ``case``; defaults everywhere else (rank 8 / alpha 8 "attn-mlp",
    AdamW, min-SNR 5, norm pull 0.1, fp32). steps is large so every measured step is in the
    "together" phase. "unet_lora": the embeddings are frozen from step 0 (phase "lora_only")."""
    kw: dict[str, Any] = dict(
        data_dir=data_dir, out_dir=out_dir, output_name="bench", steps=10_000, seed=seed,
        resolution=spec.resolution, bucket_step=min(64, spec.resolution), bucketing=False,
        batch_size=spec.batch_size, embeddings=[EmbeddingSpec(n, v, t) for n, v, t in EMBEDDINGS],
        freeze_embeddings_at=0.0 if case == "unet_lora" else 1.0, te_lora=case == "pivotal_te_lora",
        precision="fp32", latent_cache="memory",
    )
    kw.update(overrides)
    return TrainConfig(**kw).validate()


def make_dataset(folder: Path, spec: ModelSpec, count: int = 4) -> str:
    make_demo_dataset(folder, [n for n, _, _ in EMBEDDINGS], count=count, size=spec.resolution, seed=0)
    return str(folder)


# ---------------------------------------------------------------------------------------------
# the Pivotal side
# ---------------------------------------------------------------------------------------------
class PivotalSide:
    """Pivotal's trainer, one optimizer step per :meth:`step` (the body of ``_Run._loop``)."""

    name = "pivotal"

    def __init__(self, config: TrainConfig, host: DiffusersHost) -> None:
        self.config = config
        self.host = host
        run = _Run(config, host, lambda e: None, threading.Event())
        run.batches = BatchSource(config, host)
        run._build_trainables()
        run.params = run._named_params()
        run.optimizer = build_optimizer(config, run._groups())
        self.run = run
        self.batches = run.batches
        self.net = run.net
        self.embeddings = run.embeddings
        self.optimizer = run.optimizer
        self.target_norms = run.target_norms
        self.runner = StepRunner(config, host, run.net, run.embeddings, run.batches, run.generator)
        self.steps_done = 0
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "PivotalSide":
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.host.training_session(self.config.gradient_checkpointing))
        self._stack.enter_context(self.net.attached())
        self.net.train()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.net.eval()
        assert self._stack is not None
        self._stack.close()

    def step(self) -> float:
        cfg, step = self.config, self.steps_done
        lrs = apply_lrs(self.optimizer, cfg, step)
        loss = self.runner.run(step, self.optimizer)
        if loss is None:
            raise RuntimeError(f"pivotal: non-finite loss at step {step}")
        if lrs.get("embeddings", 0.0) > 0:
            for key, norm in self.target_norms.items():
                pull_norms(list(self.embeddings.vectors_for(key).values()), norm, cfg.embedding_norm_pull)
        self.steps_done += 1
        return loss

    def data(self, count: int) -> list[tuple[torch.Tensor, list[str], list]]:
        """The first ``count`` micro-batches exactly as Pivotal will read them (fills its latent cache)."""
        return [self.batches.get(i) for i in range(count * self.config.grad_accum)]


# ---------------------------------------------------------------------------------------------
# building a pair and timing it
# ---------------------------------------------------------------------------------------------
@dataclass
class Pair:
    spec: ModelSpec
    case: str
    pivotal: PivotalSide
    reference: ReferenceSide
    config: TrainConfig


def make_pair(spec: ModelSpec, case: str, host: DiffusersHost, work: Path, total_steps: int,
              seed: int = 0, lora_up_std: float = 0.0, reference_overrides: dict[str, Any] | None = None,
              **overrides: Any) -> Pair:
    """Both sides for ``case``, with the data of ``total_steps`` steps. ``lora_up_std`` > 0: start
    every LoRA from a random non-zero up matrix (both sides the same), so the LoRA path counts
    from the first step. ``reference_overrides``: settings only the reference uses (the controls
    of ``loss_parity.py``: deliberately unequal work)."""
    data_dir = work / f"data-{spec.key}"
    if not data_dir.exists():
        make_dataset(data_dir, spec)
    cfg = make_config(spec, case, str(data_dir), str(work / f"out-{spec.key}-{case}"), seed=seed, **overrides)
    piv = PivotalSide(cfg, host)
    if lora_up_std > 0:
        gen = torch.Generator().manual_seed(seed + 12345)
        with torch.no_grad():
            for m in piv.net.modules_of():
                m.algorithm.up.copy_(torch.randn(m.algorithm.up.shape, generator=gen) * lora_up_std)
    data = piv.data(total_steps)
    ref_cfg = dataclasses.replace(cfg, **reference_overrides) if reference_overrides else cfg
    ref = ReferenceSide(ref_cfg, host, piv, data)
    return Pair(spec, case, piv, ref, cfg)


@dataclass
class Timing:
    times: dict[str, list[float]] = field(default_factory=lambda: {"pivotal": [], "reference": []})
    losses: dict[str, list[float]] = field(default_factory=lambda: {"pivotal": [], "reference": []})
    ratios: list[float] = field(default_factory=list)
    #: CUDA only: peak allocated MiB while each side ran (weights shared by both included)
    cuda_peak_mib: dict[str, float] = field(default_factory=dict)
    #: matmul / convolution FLOPs of one step per side (when counted)
    flops: dict[str, float] = field(default_factory=dict)


def interleaved(pair: Pair, reps: int, warmup: int, steps_per_rep: int, count_flops: bool = False) -> Timing:
    """Warm-up steps (not timed), then ``reps`` pairs of timed runs of ``steps_per_rep`` steps
    each, alternating which side goes first (P R, R P, P R ...). Per-step seconds and losses.
    ``count_flops``: count the FLOPs of each side's last warm-up step (torch's FlopCounterMode:
    matmuls and convolutions; the CPU flash-attention kernel is not among the ops it counts)."""
    return interleave_sides({"pivotal": pair.pivotal, "reference": pair.reference}, reps, warmup, steps_per_rep,
                            count_flops)


def interleave_sides(sides: dict[str, Any], reps: int, warmup: int, steps_per_rep: int,
                     count_flops: bool = False) -> Timing:
    """:func:`interleaved` for any two sides (context managers with ``step() -> loss``); ratios are
    first / second."""
    from torch.utils.flop_counter import FlopCounterMode

    a, b = list(sides)
    out = Timing(times={a: [], b: []}, losses={a: [], b: []})
    with sides[a], sides[b]:
        for w in range(warmup):
            for name in (a, b):
                if count_flops and w == warmup - 1:
                    with FlopCounterMode(display=False) as counter:
                        out.losses[name].append(sides[name].step())
                    out.flops[name] = float(counter.get_total_flops())
                else:
                    out.losses[name].append(sides[name].step())
        for r in range(reps):
            order = (a, b) if r % 2 == 0 else (b, a)
            rep: dict[str, float] = {}
            for name in order:
                gc.collect()
                cuda_peak_reset()
                t0 = time.perf_counter()
                for _ in range(steps_per_rep):
                    out.losses[name].append(sides[name].step())
                rep[name] = (time.perf_counter() - t0) / steps_per_rep
                out.times[name].append(rep[name])
                peak = cuda_peak_mib()
                if peak is not None:
                    out.cuda_peak_mib[name] = max(peak, out.cuda_peak_mib.get(name, 0.0))
            out.ratios.append(rep[a] / rep[b])
    return out


def loss_agreement(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    diffs = [abs(x - y) for x, y in zip(a, b)]
    rels = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]
    return {"max_abs": max(diffs), "max_rel": max(rels), "n": len(diffs)}


def fmt_ratio(q: dict[str, float]) -> str:
    return f"{q['median']:.3f}"


def fmt_spread(q: dict[str, float]) -> str:
    return f"IQR {q['q1']:.3f}-{q['q3']:.3f}, range {q['min']:.3f}-{q['max']:.3f}"


