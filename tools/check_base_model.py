"""Measure how well a tiny-world weight file follows its prompts (see :mod:`pivotal.demo.pretrain.check`).

    .venv/bin/python tools/check_base_model.py [--weights FILE] [--count 64] [--sheet samples.png]

Prints JSON: the loss with right / shuffled / empty captions on unseen pictures, and the share of
sampled images whose background, object colour, place and shape match their prompt (with the
chance level of the same reading against another prompt).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

import torch  # noqa: E402

from pivotal.demo.tiny_world import WEIGHTS_FILE  # noqa: E402


def run_checks(weights: str, cache_dir: str | None = None, count: int = 64, loss_count: int = 256,
               guidance: float = 4.0, steps: int = 20, sheet: str | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    from pivotal.demo.pretrain.check import contact_sheet, loss_gap, sampling_accuracy
    from pivotal.demo.tiny_world import load_parts
    from pivotal.hosts.diffusers.host import DiffusersHost

    host = DiffusersHost(load_parts(weights, cache_dir))
    t0 = time.perf_counter()
    gap = loss_gap(host, count=loss_count)
    log(f"loss right {gap['right']:.4f} shuffled {gap['shuffled']:.4f} empty {gap['empty']:.4f} "
        f"({time.perf_counter() - t0:.0f}s)")
    t0 = time.perf_counter()
    sampled = sampling_accuracy(host, count=count, steps=steps, guidance=guidance, keep_images=bool(sheet))
    log(f"sampling accuracy {sampled['accuracy']} chance {sampled['chance']} ({time.perf_counter() - t0:.0f}s)")
    if sheet:
        contact_sheet(sampled.pop("images")).save(sheet)
    return {"loss": gap, "sampling": sampled}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(WEIGHTS_FILE))
    parser.add_argument("--count", type=int, default=64, help="prompts to sample (default 64)")
    parser.add_argument("--loss-count", type=int, default=256, help="pictures for the loss gap (default 256)")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir")
    parser.add_argument("--sheet", help="write the samples as one PNG here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run_checks(args.weights, args.cache_dir, args.count, args.loss_count, args.guidance, args.steps,
                        args.sheet, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
