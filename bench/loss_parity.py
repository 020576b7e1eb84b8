"""Loss parity: Pivotal and the reference do the same work.

From identical initial values (LoRA down *and* up random and equal on both sides, so the LoRA path
counts from the first step; embeddings from Pivotal's init; text-encoder LoRA when the case has
it), identical data order and identical noise / timesteps, both sides train for ``--steps`` (20)
steps at learning rates high enough to move the losses (UNet 1e-3, text encoder 1e-4, embeddings
1e-2), and the losses are compared step by step.

Tolerance (``--tol``, 1e-4 relative per step): both sides run the same fp32 math, but not always
in the same operation order (min-SNR weights via ``compute_snr`` vs Pivotal's ``a/(1-a)``,
``DDPMScheduler.add_noise`` vs Pivotal's ``add_noise``, peft's and Pivotal's LoRA arithmetic, the
placeholder row lookup vs the spliced vector). Each such difference is a few units of fp32's
rounding (6e-8 relative), and 20 AdamW steps can amplify them, since Adam's early updates are
nearly sign(gradient) x LR. 1e-4 leaves that rounding three orders of magnitude of room, and the
controls show it is tight: each control makes the reference do slightly *different* work (skip
one piece of the training, or raise one learning rate by 1 %) and must land above the tolerance.

    .venv/bin/python bench/loss_parity.py --json bench/results/loss_parity.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    CASE_LABELS,
    CASES,
    MODELS,
    ModelSpec,
    add_threads_arg,
    apply_threads,
    build_host,
    load_average,
    loss_agreement,
    machine_info,
    make_pair,
    print_table,
    write_json,
)

#: learning rates that move the losses visibly within 20 steps (as the trainer's own tests use)
LRS = dict(unet_lr=1e-3, te_lr=1e-4, embedding_lr=1e-2)
LORA_UP_STD = 0.02
#: (control name, case, reference-only settings): deliberately unequal work
CONTROLS = (
    ("reference does not train the embeddings", "pivotal", {"freeze_embeddings_at": 0.0}),
    ("reference without the embedding norm pull", "pivotal", {"embedding_norm_pull": 0.0}),
    ("reference does not train the TE LoRA", "pivotal_te_lora", {"te_lr": 0.0}),
    ("reference UNet LR 1% higher", "unet_lora", {"unet_lr": LRS["unet_lr"] * 1.01}),
)
SD15_SMALL = ModelSpec("sd15-arch-128", "sd1", 128, 1, "SD1.5 architecture (random), 128 px, batch 1")


def run(spec: ModelSpec, host, case: str, work: Path, steps: int, reference_overrides=None) -> dict:
    pair = make_pair(spec, case, host, work, steps, lora_up_std=LORA_UP_STD,
                     reference_overrides=reference_overrides, **LRS)
    losses: dict[str, list[float]] = {"pivotal": [], "reference": []}
    with pair.pivotal, pair.reference:
        for _ in range(steps):
            losses["pivotal"].append(pair.pivotal.step())
            losses["reference"].append(pair.reference.step())
    agree = loss_agreement(losses["pivotal"], losses["reference"])
    del pair
    gc.collect()
    return {"model": spec.key, "case": case, "case_label": CASE_LABELS[case], "losses": losses,
            "agreement": agree, "reference_overrides": reference_overrides or {}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tol", type=float, default=1e-4, help="largest allowed relative difference per step")
    ap.add_argument("--no-sd15", action="store_true", help="skip the SD1.5-architecture run")
    add_threads_arg(ap)
    args = ap.parse_args(argv)
    apply_threads(args.threads)

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pivotal-parity-"))
    runs, controls = [], []
    specs = [MODELS["sd1-tiny"], MODELS["sdxl-tiny"]] + ([] if args.no_sd15 else [SD15_SMALL])
    for spec in specs:
        host = build_host(spec)
        cases = CASES if not spec.key.startswith("sd15") else ("pivotal_te_lora",)
        for case in cases:
            r = run(spec, host, case, work, args.steps)
            r["pass"] = r["agreement"]["max_rel"] <= args.tol
            runs.append(r)
            print(f"[loss_parity] {spec.key} {case}: max rel diff {r['agreement']['max_rel']:.2e}", flush=True)
        if spec.key == "sd1-tiny":
            for label, case, overrides in CONTROLS:
                r = run(spec, host, case, work, args.steps, overrides)
                r["control"] = label
                r["detected"] = r["agreement"]["max_rel"] > args.tol
                controls.append(r)
                print(f"[loss_parity] control {label}: max rel diff {r['agreement']['max_rel']:.2e}", flush=True)
        del host
        gc.collect()

    print_table(["model", "case", "steps", "max abs diff", "max rel diff", "tolerance", "equal work"],
                [[r["model"], r["case_label"], r["agreement"]["n"], f"{r['agreement']['max_abs']:.2e}",
                  f"{r['agreement']['max_rel']:.2e}", f"{args.tol:.0e}", "yes" if r["pass"] else "NO"] for r in runs],
                title=f"Loss parity: first {args.steps} losses, Pivotal vs reference")
    print_table(["control (reference does different work)", "model", "max rel diff", "above tolerance"],
                [[r["control"], r["model"], f"{r['agreement']['max_rel']:.2e}", "yes" if r["detected"] else "NO"]
                 for r in controls], title="Controls: the tolerance is tight enough to see unequal work")
    ok = all(r["pass"] for r in runs)
    write_json(args.json, {"benchmark": "loss_parity", "machine": machine_info(), "tolerance": args.tol,
                           "steps": args.steps, "learning_rates": LRS, "lora_up_std": LORA_UP_STD,
                           "runs": runs, "controls": controls, "all_equal": ok,
                           "all_controls_detected": all(r["detected"] for r in controls),
                           "load_average_end": load_average(), "wall_s": time.perf_counter() - started})
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
