"""``pivotal grid``: the ablation grid of one bundle on the standalone host.

Columns: full bundle / UNet LoRA only / text-encoder LoRA only / embeddings only / base model (names
as plain text); rows: the ``--prompt`` texts plus ``--auto-prompts`` prompts in contexts the
bundle's captions never had; one seed per row. Writes OUT.png (labelled, infotext inside) and
OUT.json (what each cell was).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pivotal.errors import ConfigError

# The same ids as pivotal.inference.grid.COLUMNS, repeated so that building the parser imports no torch.
COLUMN_IDS = ("full", "unet", "te", "emb", "base")


def add_grid_command(sub: Any) -> None:
    """Register ``grid`` on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("grid", help="ablation grid of a bundle: full / UNet only / TE only / embeddings only / base")
    p.add_argument("bundle", metavar="BUNDLE.safetensors", help="the bundle to compare part by part")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", metavar="PATH", help="a diffusers pipeline folder (SD1 or SDXL)")
    model.add_argument("--demo", choices=("sd1", "sdxl"), help="a tiny demo model (sd1 pre-trained, sdxl random)")
    p.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="TEXT",
                   help="a row (repeatable); write the embedding names in it, no <lora:> tag")
    p.add_argument("--auto-prompts", type=int, default=2, metavar="N",
                   help="add N rows in contexts the bundle's captions never had (default 2)")
    p.add_argument("--columns", default=",".join(COLUMN_IDS),
                   help=f"comma-separated, from {', '.join(COLUMN_IDS)} (default: all)")
    p.add_argument("--negative", default="")
    p.add_argument("--strength", type=float, default=1.0, help="the LoRA strength of the full/UNet/TE columns")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="row i uses seed + i")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--sampler", choices=("euler", "ddim"), default="euler")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, metavar="PNG", help="the sheet to write (a .json is written beside it)")
    p.set_defaults(run=run_grid)


def run_grid(args: argparse.Namespace) -> int:
    from pivotal.demo.host import load_host
    from pivotal.inference.grid import bundle_grid_plan, host_renderer, render_grid
    from pivotal.inference.grid_sheet import save_grid

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the grid is written as a .png file")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist")
    bundle = Path(args.bundle)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    contexts: dict[str, Any] = {}
    if args.demo == "sd1":  # the tiny world knows only its own words: contexts in them
        from pivotal.demo.data import GRID_CONTEXTS

        contexts["contexts"] = GRID_CONTEXTS
    plan = bundle_grid_plan(str(bundle), args.prompts, args.auto_prompts, columns, args.seed, args.negative,
                            args.strength, **contexts)
    host = load_host(model=args.model, demo=args.demo, device=args.device)
    host.sampler = args.sampler
    render = host_renderer(host, [str(bundle.parent)], args.steps, args.width, args.height, args.guidance)

    def progress(done: int, total: int, cell: Any) -> None:
        print(f"cell {done + 1}/{total}: {cell.prompt}", file=sys.stderr, flush=True)

    png, record = save_grid(out, render_grid(plan, render, progress))
    for column, note in plan.notes.items():
        print(f"pivotal: note: {column}: {note}", file=sys.stderr)
    print(png)
    print(record)
    return 0
