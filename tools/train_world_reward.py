"""Train the tiny-world reward's scorer and write its weights (by default over the shipped file,
``lib/pivotal/demo/weights/tiny-world-reward.safetensors``).

    .venv/bin/python tools/train_world_reward.py              # the shipped weights, ~2 min on 1 CPU thread
    .venv/bin/python tools/train_world_reward.py --out /tmp/r.safetensors --steps 100

Deterministic: on one thread (the default) the same libraries write the same file byte for byte.
The settings are :class:`pivotal.demo.reward_train.ScorerSettings`; the accuracy per attribute on
unseen renders is printed and recorded in the file's metadata.
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

from pivotal.demo.reward import REWARD_FILE  # noqa: E402
from pivotal.demo.reward_train import ScorerSettings, train_scorer, write_scorer  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REWARD_FILE), help="weight file to write (default: the shipped one)")
    parser.add_argument("--steps", type=int, help="override the training steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: reproducible)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = ScorerSettings()
    if args.steps:
        settings = dataclasses.replace(settings, steps=args.steps)
    started = time.perf_counter()
    model, report = train_scorer(settings, log)
    write_scorer(model, report, args.out)  # no timings in the file: the same run writes the same bytes
    log(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes) in {time.perf_counter() - started:.0f} s")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
