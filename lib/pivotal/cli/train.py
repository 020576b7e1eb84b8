"""``pivotal train``: flags and/or a TOML/JSON config → a training run on the standalone host.

Every setting has a flag, generated from its declaration in
:class:`~pivotal.training.config.TrainConfig` (bools as ``--x/--no-x``, lists as a repeatable flag).
Precedence: defaults < ``--demo`` defaults < config file < flags given on the command line.
``--out X.safetensors`` writes the bundle to X (the folder is X's, the name X's stem). ``--demo`` without
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

from pivotal.demo.settings import DEMO_EMBEDDING, DEMO_SETTINGS
from pivotal.errors import ConfigError
from pivotal.training.config import EmbeddingSpec, TrainConfig
from pivotal.training.config_file import load_config_file
from pivotal.training.progress import ProgressEvent
from pivotal.training.settings import GROUPS, DeclaredSetting, declared

BUNDLE_SUFFIX = ".safetensors"
_METAVARS = {"int": "N", "float": "NUM", "str": "TEXT"}


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train LoRA + embeddings into a bundle (standalone host)",
                       usage="pivotal train [--model DIR | --demo {sd1,sdxl}] [--config FILE] [--resume FILE] "
                       "[--json] [--device DEVICE] [SETTING FLAGS ...]",
                       description="Train LoRA + embeddings into a bundle on the standalone host. Every setting "
                       "has a flag; precedence: defaults < --demo defaults < --config file < flags. The settings "
                       "file schema: pivotal train --print-schema.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH", help="a diffusers model folder or a single-file .safetensors "
                     "checkpoint")
    src.add_argument("--demo", choices=("sd1", "sdxl"), help="a tiny demo model (sd1: pre-trained on a world of "
                     "coloured shapes; sdxl: random weights; runs on a CPU in seconds)")
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings (flags override it)")
    p.add_argument("--resume", metavar="FILE", help="a *.resume.safetensors file to continue from")
    p.add_argument("--json", action="store_true", help="one JSON line per event, then a summary line")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--print-schema", action="store_true",
                   help="print the JSON Schema of the settings (config file, webui API) and exit")
    add_setting_flags(p)
    p.set_defaults(run=run_train)


def add_setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per declared setting, in titled groups; each flag's ``dest`` is the setting's name
    and its default None (= not given, so a config file's value stands)."""
    settings = list(declared(TrainConfig))
    for group in GROUPS:
        g = p.add_argument_group(group.title)
        for s in settings:
            if s.spec.group == group.key:
                _add_flag(g, s)


def _add_flag(g: argparse._ArgumentGroup, s: DeclaredSetting) -> None:
    # argparse formats help with %: a literal one is written %%
    help_text = s.spec.help.replace("%", "%%")
    flag = "--" + s.flag
    if s.kind == "bool":
        g.add_argument(flag, dest=s.name, action=argparse.BooleanOptionalAction, default=None,
                       help=f"{help_text} (default: {'on' if s.default else 'off'})")
        return
    metavar = s.spec.metavar or ("{" + ",".join(s.choices) + "}" if s.choices else _METAVARS[s.kind])
    if s.kind in ("embeddings", "str_list"):
        g.add_argument(flag, dest=s.name, action="append", default=None, metavar=metavar, help=help_text)
        return
    convert = {"int": int, "float": float, "str": str}[s.kind]
    default = f" (default: {s.default})" if s.default != "" else ""
    g.add_argument(flag, dest=s.name, type=convert, default=None, metavar=metavar, help=help_text + default)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (name -> value); a repeated flag's values replace a list."""
    values: dict[str, Any] = {}
    for s in declared(TrainConfig):
        v = getattr(args, s.name, None)
        if v is None:
            continue
        values[s.name] = [EmbeddingSpec.parse(e) for e in v] if s.kind == "embeddings" else v
    out = values.get("out_dir")
    if isinstance(out, str) and out.lower().endswith(BUNDLE_SUFFIX):
        values.update(_bundle_path_out(out, values.get("output_name")))
    return values


def _bundle_path_out(out: str, name: Any) -> dict[str, str]:
    """``--out X.safetensors``: the bundle is written to X, so the folder is X's and the name X's stem."""
    path = Path(out)
    if name is not None and name != path.stem:
        raise ConfigError(f"--out {out} names the bundle {path.stem!r} but --name says {name!r}; "
                          "give one of them, or a folder as --out")
    return {"out_dir": str(path.parent), "output_name": path.stem}


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < demo defaults < config file < flags."""
    given = load_config_file(args.config) if args.config else {}
    given.update(flag_values(args))
    values: dict[str, Any] = dict(DEMO_SETTINGS) if args.demo else {}
    reward_mode = given.get("mode") == "textcraftor"
    if args.demo and reward_mode:
        from pivotal.demo.reward import demo_textcraftor_settings

        # the demo's reward fine-tuning (where nothing else spoke): the rules reward on world captions
        # whose object colours are words the model never saw, so the encoder has something to learn
        recipe = demo_textcraftor_settings()
        if given.get("reward_prompts") or given.get("reward_prompts_file"):  # the user's prompts only
            del recipe["reward_prompts"]
        values.update(recipe)
    values.update(given)
    if args.demo and not values.get("embeddings") and not reward_mode:
        values["embeddings"] = [EmbeddingSpec.parse(DEMO_EMBEDDING)]
    cfg = TrainConfig.from_dict(values)
    if args.demo and not cfg.data_dir and not reward_mode:
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
        elif e.kind == "validation":
            print(f"step {e.step}/{e.total}  {e.message}", flush=True)
        elif e.kind in ("start", "phase", "save", "warning", "done"):
            text = e.path or e.message or e.phase
            print(f"{e.kind}: {text}", flush=True)
    return emit


def run_train(args: argparse.Namespace) -> int:
    if args.print_schema:
        from pivotal.training.schema import config_schema

        print(json.dumps(config_schema(), indent=2))
        return 0
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

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
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
        if result.validation_loss is not None:
            trend += f"  validation loss {result.validation_loss:.4f}"
        print(f"{result.status}: {result.steps_done}/{result.total_steps} steps{trend}  {result.bundle_path}")
    return code
