"""``pivotal sweep BASE --vary te_lr=1e-6,1e-5,1e-4 [--vary ...] --out FOLDER``: write one config per
combination into FOLDER (:mod:`pivotal.training.sweep`), then train them as a queue (``pivotal queue
FOLDER``: resumable, finished runs skipped) and print the table ranked by validation loss.

``--grid [PROMPT]``: then the variants x parts grid, next to the sweep (FOLDER/sweep-grid.png + .json).

Exit status: as ``pivotal queue``; ``--write-only``: 0 once the configs are written.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_sweep_command(sub: Any) -> None:
    """Register the ``sweep`` subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("sweep", help="train variants of one config that differ in one or two settings, then rank "
                                     "them by validation loss")
    p.add_argument("base", metavar="BASE_CONFIG", help="the settings file (.toml/.json) every variant starts from")
    p.add_argument("--vary", action="append", required=True, metavar="NAME=V1,V2,...",
                   help="a setting and its values (at most twice), e.g. te_lr=1e-6,1e-5,1e-4")
    p.add_argument("--out", required=True, metavar="FOLDER", help="the folder for the variants' configs (a queue)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a diffusers model folder or a single-file .safetensors checkpoint")
    src.add_argument("--demo", choices=("sd1", "sdxl"), help="a tiny demo model")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="one JSON line per finished run, then the summary")
    p.add_argument("--write-only", action="store_true", help="write the configs; train them later with "
                                                              "pivotal queue FOLDER")
    p.add_argument("--grid", nargs="?", const="", default=None, metavar="PROMPT",
                   help="after the runs, render the variants x parts grid (rows: the variants, best validation "
                        "loss first; columns: full / UNet / TE / embeddings / base) of PROMPT (default: the "
                        "embedding names) into FOLDER/sweep-grid.png + .json")
    p.add_argument("--grid-seed", type=int, default=0, metavar="N", help="the grid's seed (every cell)")
    p.add_argument("--grid-steps", type=int, default=20, metavar="N", help="the grid's sampling steps")
    p.set_defaults(run=run_sweep_command)


def run_sweep_command(args: argparse.Namespace) -> int:
    from pivotal.cli.queue import run_queue_command
    from pivotal.errors import ConfigError
    from pivotal.training.sweep import ranked, write_sweep

    if not args.write_only and not (args.model or args.demo):
        raise ConfigError("sweep: give --model or --demo to train the variants, or --write-only")
    paths = write_sweep(args.base, args.vary, args.out)  # every value is checked before any file is written
    print(f"sweep: {len(paths)} config(s) in {args.out}: " + ", ".join(p.name for p in paths), flush=True)
    if args.write_only:
        return 0
    return run_queue_command(argparse.Namespace(folder=args.out, model=args.model, demo=args.demo,
                                                device=args.device, json=args.json), order=ranked,
                             after=(lambda runs, host: _grid(args, host)) if args.grid is not None else None)


def _grid(args: argparse.Namespace, host: Any) -> None:
    """The variants x parts grid of the sweep in ``args.out`` (Pivotal's own render on ``host``)."""
    from pivotal.inference.sweep_grid import render_sweep_grid, standalone_renderer

    png, record = render_sweep_grid(args.out, standalone_renderer(host, steps=args.grid_steps), args.grid,
                                    seed=args.grid_seed)
    print(f"sweep grid: {png} ({record})", flush=True)
