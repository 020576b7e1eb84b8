"""``pivotal generate``: one image from the standalone host, bundles applied from ``<lora:...>`` tags.

The PNG is written atomically (temporary file next to it, then renamed) and carries the settings
as a "parameters" text chunk in the webui's infotext style, so the webui's PNG Info tab reads it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pivotal.errors import ConfigError
from pivotal.formats.png import write_png

# The same names as pivotal.hosts.diffusers.sampling.SAMPLERS, repeated so that building the
# parser imports no torch.
SAMPLERS = ("euler", "ddim")


def add_generate_command(sub: Any) -> None:
    """Register the ``generate`` subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("generate", help="generate an image (standalone diffusers host), applying "
                                        "<lora:NAME:WEIGHT> bundles from --lora-dir")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", metavar="PATH",
                       help="a diffusers pipeline folder or a single-file .safetensors checkpoint (SD1 or SDXL)")
    model.add_argument("--demo", choices=("sd1", "sdxl"), help="a tiny demo model (sd1 pre-trained, sdxl random)")
    p.add_argument("--prompt", required=True, help="the prompt; <lora:NAME:WEIGHT> tags apply bundles")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--sampler", choices=SAMPLERS, default="euler")
    p.add_argument("--lora-dir", dest="lora_dirs", metavar="DIR", action="extend", nargs="+", default=[],
                   help="folder(s) searched for NAME.safetensors (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--out", required=True, metavar="PNG", help="the image file to write")
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    """Body of ``pivotal generate``; PivotalErrors propagate to the CLI's one-line handler."""
    from pivotal.demo.host import load_host
    from pivotal.inference.generate import format_infotext, generate_image

    out = Path(args.out)
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist")
    host = load_host(model=args.model, demo=args.demo, device=args.device)
    host.sampler = args.sampler
    image, info = generate_image(host, args.prompt, args.negative, args.lora_dirs, args.steps, args.seed,
                                 args.width, args.height, args.guidance)
    write_png(out, image, format_infotext(info))
    for w in info["warnings"]:
        print(f"pivotal: warning: {w}", file=sys.stderr)
    print(out)
    return 0
