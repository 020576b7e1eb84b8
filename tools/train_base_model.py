"""Pre-train the tiny-world SD1 demo model and write its weights (by default over the shipped file,
``lib/pivotal/demo/weights/tiny-world-sd1.safetensors``), then prove it follows prompts.

    .venv/bin/python tools/train_base_model.py                 # the shipped weights, ~20 min on 1 CPU thread
    .venv/bin/python tools/train_base_model.py --out /tmp/m.safetensors --report /tmp/m.json
    .venv/bin/python tools/train_base_model.py --out /tmp/m.safetensors --set diffusion.steps=3000 \
        --set diffusion.timestep_power=2      # any field of PretrainSettings, dotted, value in JSON

Deterministic: on one thread (the default) the same libraries write the same file byte for byte.
The settings are :class:`pivotal.demo.pretrain.run.PretrainSettings`; ``--quick`` trains a few steps only
(to test the pipeline). ``--no-check`` skips the prompt-following checks
(:mod:`pivotal.demo.pretrain.check`, also ``tools/check_base_model.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

import torch  # noqa: E402

from pivotal.demo.pretrain.run import QUICK, PretrainSettings, pretrain  # noqa: E402
from pivotal.demo.tiny_world import WEIGHTS_FILE  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def with_field(settings: PretrainSettings, item: str) -> PretrainSettings:
    """``settings`` with the field ``item`` = "a.b=JSON" replaced (``a``: a nested settings group)."""
    name, sep, text = item.partition("=")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise SystemExit(f"--set {item}: the value must be JSON (e.g. 3000, 2e-3, true, [0.2])") from None
    path = name.strip().split(".")
    objs: list[object] = [settings]
    for part in path[:-1]:
        objs.append(getattr(objs[-1], part, None))
    leaf = objs[-1]
    if not sep or not dataclasses.is_dataclass(leaf) or path[-1] not in {f.name for f in dataclasses.fields(leaf)}:
        raise SystemExit(f"--set {item}: no settings field {name!r} (fields: see pivotal.demo.pretrain.run."
                         "PretrainSettings, VaeSettings, DiffusionSettings)")
    if isinstance(getattr(leaf, path[-1]), tuple):
        value = tuple(value)
    new: object = dataclasses.replace(leaf, **{path[-1]: value})  # type: ignore[type-var]
    for obj, part in zip(reversed(objs[:-1]), reversed(path[:-1])):
        new = dataclasses.replace(obj, **{part: new})  # type: ignore[type-var]
    return new  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(WEIGHTS_FILE), help="weight file to write (default: the shipped one)")
    parser.add_argument("--quick", action="store_true", help="a few steps only, to test the pipeline")
    parser.add_argument("--vae-steps", type=int, help="override the VAE's steps")
    parser.add_argument("--steps", type=int, help="override the diffusion steps")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="override one field of PretrainSettings, e.g. diffusion.lr=2e-3 (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: reproducible, "
                        "and leaves the other cores free)")
    parser.add_argument("--cache-dir", help="where the CLIP tokenizer files are written once")
    parser.add_argument("--no-check", action="store_true", help="skip the prompt-following checks")
    parser.add_argument("--report", help="also write the report (JSON) here")
    parser.add_argument("--sheet", help="write the checked samples as one PNG here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else PretrainSettings()
    if args.vae_steps is not None:
        settings = dataclasses.replace(settings, vae=dataclasses.replace(settings.vae, steps=args.vae_steps))
    if args.steps is not None:
        settings = dataclasses.replace(settings, diffusion=dataclasses.replace(settings.diffusion, steps=args.steps))
    for item in args.set:
        settings = with_field(settings, item)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report = pretrain(settings, args.out, args.cache_dir, log)
    if not args.no_check:
        from check_base_model import run_checks  # tools/ is on sys.path: this file's folder

        report["checks"] = run_checks(args.out, args.cache_dir, sheet=args.sheet, log=log)
    text = json.dumps(report, indent=2, sort_keys=True)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
