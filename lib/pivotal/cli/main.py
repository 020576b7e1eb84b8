"""The ``pivotal`` command line: ``inspect``, ``export-embeddings``, ``convert``, ``app``, ``train``,
``generate``, ``export-checkpoint``, ``export-diffusers``, ``queue``, ``sweep``.

Errors Pivotal raises on purpose (bad files, bad settings) print one line naming the file and the
problem and exit with status 2; there is no traceback for those.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from pivotal import __version__
from pivotal.cli.export_diffusers import add_export_diffusers_command
from pivotal.cli.generate import add_generate_command
from pivotal.cli.grid import add_grid_command
from pivotal.cli.queue import add_queue_command
from pivotal.cli.sweep import add_sweep_command
from pivotal.errors import PivotalError

EXIT_USAGE = 2


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pivotal.formats.inspect_report import format_report, inspect_bundle

    report = inspect_bundle(args.file)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_report(report))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pivotal.formats.export import export_embeddings

    for path in export_embeddings(args.file, args.dir, force=args.force):
        print(path)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from pivotal.formats.export import convert_pickle

    keys = convert_pickle(args.src, args.dst)
    print(f"wrote {args.dst} ({len(keys)} tensors)")
    return 0


def _cmd_export_checkpoint(args: argparse.Namespace) -> int:
    from pivotal.demo.checkpoint import export_checkpoint

    for path in export_checkpoint(args.out, half=args.half, force=args.force):
        print(path)
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    from pivotal.ui.app import run_app  # gradio is imported only when the app is asked for

    return run_app(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pivotal", description="Pivotal tuning: LoRA + embeddings bundles.")
    parser.add_argument("--version", action="version", version=f"pivotal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show what a bundle / LoRA file holds")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("export-embeddings", help="write each bundled embedding as its own file")
    p.add_argument("file", help="the bundle (.safetensors)")
    p.add_argument("dir", help="output folder, e.g. the webui's embeddings folder")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser("convert", help="convert a TRUSTED pickle (.pt/.ckpt/.bin) LoRA or embedding "
                                       "to safetensors (needs torch >= 2.10)")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(run=_cmd_convert)

    p = sub.add_parser("app", help="the web app (Train and Generate tabs) on 127.0.0.1")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--demo", choices=("sd1", "sdxl"), help="a tiny demo model (sd1: pre-trained on a world of "
                     "coloured shapes; sdxl: random weights) and a synthetic dataset")
    src.add_argument("--model", help="a diffusers model folder or a single-file .safetensors checkpoint (SD 1.x, SDXL)")
    p.add_argument("--out", default="output", help="output folder for bundles (default: output)")
    p.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default: 7860)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    p.set_defaults(run=_cmd_app)

    p = sub.add_parser("export-checkpoint", help="write the sd1 demo model as a single-file LDM checkpoint "
                                                 "(+ same-named .yaml and -clip/ folder) for a webui")
    p.add_argument("--demo", choices=("sd1",), required=True, help="the model to export (the pre-trained demo)")
    p.add_argument("out", metavar="OUT.safetensors")
    p.add_argument("--half", action="store_true", help="fp16 weights (default fp32: exactly the demo model)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(run=_cmd_export_checkpoint)

    from pivotal.cli.train import add_train_parser  # light: imports no torch model code

    add_train_parser(sub)
    add_generate_command(sub)
    add_grid_command(sub)
    add_export_diffusers_command(sub)
    add_queue_command(sub)
    add_sweep_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        # a name read from a file can hold a lone surrogate: print it escaped rather than crash
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except PivotalError as e:
        print(f"pivotal: error: {e}", file=sys.stderr)
        return EXIT_USAGE
