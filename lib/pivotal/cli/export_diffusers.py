"""``pivotal export-diffusers BUNDLE OUT``: a bundle as a folder diffusers loads (see
:mod:`pivotal.formats.diffusers_export`)."""

from __future__ import annotations

import argparse
from typing import Any


def add_export_diffusers_command(sub: Any) -> None:
    """Register the ``export-diffusers`` subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("export-diffusers", help="write a bundle as a folder diffusers loads "
                                                "(pipe.load_lora_weights(OUT) + one file per embedding)")
    p.add_argument("bundle", help="the bundle (.safetensors)")
    p.add_argument("out", help="the folder to write (created; its parent must exist)")
    p.add_argument("--force", action="store_true", help="overwrite an earlier export in OUT")
    p.set_defaults(run=run_export_diffusers)


def run_export_diffusers(args: argparse.Namespace) -> int:
    from pivotal.formats.diffusers_export import export_for_diffusers

    for path in export_for_diffusers(args.bundle, args.out, force=args.force):
        print(path)
    return 0
