"""``pivotal train``: flags and/or a TOML/JSON config → a training run on the standalone host.

Precedence: defaults < config file < flags given on the command line. ``--demo`` without
``--data`` writes a small synthetic captioned dataset under ``<out>/demo_data`` first: pictures of
a character the pre-trained sd1 demo model never saw (:data:`pivotal.demo.world.EXAMPLE_CHARACTER`).
Exit status: 0 completed, 1 stopped (diverged), 2 refused (bad settings/files), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pivotal.training.config import DEMO_EMBEDDING, DEMO_SETTINGS, EmbeddingSpec, TrainConfig, load_config_file
from pivotal.training.progress import ProgressEvent

#: flag -> TrainConfig field, for the flags that map one to one
FLAG_FIELDS = {
    "data": "data_dir", "out": "out_dir", "name": "output_name", "steps": "steps", "batch_size": "batch_size",
    "grad_accum": "grad_accum", "seed": "seed", "resolution": "resolution", "lora_preset": "lora_preset",
    "unet_rank": "unet_rank", "unet_alpha": "unet_alpha", "unet_lr": "unet_lr", "te_rank": "te_rank",
    "te_lr": "te_lr", "embedding_lr": "embedding_lr", "phase_plan": "phase_plan",
    "freeze_embeddings_at": "freeze_embeddings_at", "embedding_steps": "embedding_steps",
    "embedding_lr_after": "embedding_lr_after", "optimizer": "optimizer", "schedule": "schedule",
    "warmup_steps": "warmup_steps", "precision": "precision", "min_snr_gamma": "min_snr_gamma",
    "noise_offset": "noise_offset", "save_every": "save_every", "on_interrupt": "on_interrupt",
    "preview_every": "preview_every", "flip": "flip", "te_lora": "te_lora",
    "gradient_checkpointing": "gradient_checkpointing", "shuffle_tags": "shuffle_tags",
    "caption_dropout": "caption_dropout",
}


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train LoRA + embeddings into a bundle (standalone host)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a diffusers model folder or a single-file .safetensors checkpoint")
    src.add_argument("--demo", choices=("sd1", "sdxl"), help="a tiny demo model (sd1: pre-trained on a world of "
                     "coloured shapes; sdxl: random weights; runs on a CPU in seconds)")
    p.add_argument("--config", help="TOML or JSON file of settings (flags override it)")
    p.add_argument("--embedding", action="append", default=None, metavar="NAME[:VECTORS[:INIT TEXT]]",
                   help="a new embedding (repeatable), e.g. mychar:2:woman")
    p.add_argument("--resume", help="a *.resume.safetensors file to continue from")
    p.add_argument("--json", action="store_true", help="one JSON line per event, then a summary line")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    ints = ("steps", "batch_size", "grad_accum", "seed", "resolution", "unet_rank", "te_rank", "embedding_steps",
            "warmup_steps", "save_every", "preview_every")
    floats = ("unet_alpha", "unet_lr", "te_lr", "embedding_lr", "freeze_embeddings_at", "embedding_lr_after",
              "min_snr_gamma", "noise_offset", "caption_dropout")
    for name in ("data", "out", "name", "lora_preset", "phase_plan", "optimizer", "schedule", "precision",
                 "on_interrupt"):
        p.add_argument("--" + name.replace("_", "-"), dest=name)
    for name in ints:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int)
    for name in floats:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=float)
    for name in ("flip", "te_lora", "gradient_checkpointing", "shuffle_tags"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", default=None)
    p.set_defaults(run=run_train)


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < demo defaults < config file < flags."""
    values: dict[str, Any] = dict(DEMO_SETTINGS) if args.demo else {}
    if args.config:
        values.update(load_config_file(args.config))
    for flag, field_name in FLAG_FIELDS.items():
        v = getattr(args, flag, None)
        if v is not None:
            values[field_name] = v
    if args.embedding:
        values["embeddings"] = [EmbeddingSpec.parse(e) for e in args.embedding]
    elif args.demo and not values.get("embeddings"):
        values["embeddings"] = [EmbeddingSpec.parse(DEMO_EMBEDDING)]
    cfg = TrainConfig.from_dict(values)
    if args.demo and not cfg.data_dir:
        from pivotal.demo.data import make_demo_dataset
        from pivotal.demo.world import EXAMPLE_CHARACTER

        folder = Path(cfg.out_dir) / "demo_data"
        if not folder.is_dir() or not any(folder.iterdir()):
            folder.mkdir(parents=True, exist_ok=True)
            make_demo_dataset(folder, [e.name for e in cfg.embeddings], seed=cfg.seed, character=EXAMPLE_CHARACTER)
        cfg.data_dir = str(folder)
    return cfg.validate()


def _printer(as_json: bool):
    def emit(e: ProgressEvent) -> None:
        if as_json:
            if e.kind != "preview":
                print(json.dumps(e.to_json()), flush=True)
            return
        if e.kind == "preflight":
            print(e.message, flush=True)
        elif e.kind == "step" and (e.step % 10 == 0 or e.step == e.total):
            eta = f"  eta {e.eta_s:.0f}s" if e.eta_s is not None else ""
            print(f"step {e.step}/{e.total}  loss {e.loss:.4f}  smoothed {e.smoothed_loss:.4f}  [{e.phase}]{eta}",
                  flush=True)
        elif e.kind in ("start", "phase", "save", "warning", "done"):
            text = e.path or e.message or e.phase
            print(f"{e.kind}: {text}", flush=True)
    return emit


def run_train(args: argparse.Namespace) -> int:
    from pivotal.demo.host import load_host
    from pivotal.training.distributed import launched_rank
    from pivotal.training.trainer import train

    cfg = build_config(args)
    host = load_host(model=args.model, demo=args.demo, device=args.device)
    stop = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.is_set():  # a second Ctrl-C: leave now
            raise KeyboardInterrupt
        stop.set()
        print("interrupt: stopping at the next step (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    try:
        result = train(cfg, host, _printer(args.json), stop, resume=args.resume)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    code = {"completed": 0, "stopped": 1, "interrupted": 130}.get(result.status, 1)
    if launched_rank() > 0:  # data-parallel (torchrun / accelerate launch): rank 0 reports
        return code
    if args.json:
        print(json.dumps({"event": "summary", **result.summary()}), flush=True)
    else:
        first, last = result.first_smoothed_loss, result.last_smoothed_loss
        trend = f"  smoothed loss {first:.4f} -> {last:.4f}" if first is not None and last is not None else ""
        print(f"{result.status}: {result.steps_done}/{result.total_steps} steps{trend}  {result.bundle_path}")
    return code
