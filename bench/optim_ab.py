"""Before / after for the step optimizations: Pivotal as it is now against Pivotal with them
switched off, interleaved in one process (the same method as ``step_time.py``).

Switched off on the "before" side:
* the frozen-text cache (``StepRunner._text_cacheable = False``): the text encoder runs every
  step even while nothing on the text side trains;
* the prompt memo (``PromptTokenizer.build_prompt_ids`` -> the unmemoized builder): every caption
  is re-tokenized every step.

The two sides are two hosts over the same weight storage (so both stay attached). The table also
times tokenizing one step's captions alone, with and without the memo.

    .venv/bin/python bench/optim_ab.py --json bench/results/optim_ab.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers import UNet2DConditionModel  # noqa: E402

from _common import (  # noqa: E402
    CASE_LABELS,
    MODELS,
    PivotalSide,
    add_threads_arg,
    apply_threads,
    build_host,
    fmt_spread,
    interleave_sides,
    load_average,
    loss_agreement,
    machine_info,
    make_config,
    make_dataset,
    print_table,
    quantiles,
    share_clone,
    write_json,
)
from pivotal.hosts.diffusers.host import DiffusersHost  # noqa: E402
from pivotal.hosts.diffusers.parts import PipelineParts  # noqa: E402

#: (model, case, (warm-up, pairs, steps per run))
PLAN = (("sd1-tiny", "unet_lora", (3, 12, 4)), ("sd1-tiny", "pivotal", (3, 12, 4)),
        ("sdxl-tiny", "unet_lora", (3, 12, 4)), ("sd15-arch", "unet_lora", (1, 4, 1)))


def twin_host(host: DiffusersHost) -> DiffusersHost:
    """A second host over the same weights (separate module objects), so a second LoRA can attach."""
    cfg = dict(host.unet.config)
    unet = share_clone(host.unet, lambda: UNet2DConditionModel.from_config(cfg))
    encoders = {k: share_clone(te, lambda te=te: type(te)(te.config)) for k, te in host._encoders.items()}
    parts = PipelineParts(base_model=host.base_model, unet=unet, vae=host.vae, text_encoders=encoders,
                          tokenizers=dict(host._tokenizers), scheduler_config=dict(host.scheduler_config),
                          force_zeros_for_empty_prompt=host.force_zeros_for_empty_prompt)
    return DiffusersHost(parts, label=host.label + " (twin)")


def switch_off(side: PivotalSide) -> PivotalSide:
    side.runner._text_cacheable = False
    for key in side.host.encoder_keys():
        pt = side.host.prompt_tokenizer(key, side.embeddings)
        pt.build_prompt_ids = pt._build_prompt_ids  # instance attribute: this tokenizer only
    return side


def tokenize_micro(side_now: PivotalSide, side_off: PivotalSide, reps: int = 200) -> dict:
    captions = side_now.batches.get(0)[1]
    out = {}
    for label, side in (("memo", side_now), ("no memo", side_off)):
        pts = [side.host.prompt_tokenizer(k, side.embeddings) for k in side.host.encoder_keys()]
        for pt in pts:
            pt.build_batch(captions)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for pt in pts:
                pt.build_batch(captions)
            times.append(time.perf_counter() - t0)
        out[label] = quantiles(times)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--no-sd15", action="store_true")
    add_threads_arg(ap)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pivotal-ab-"))
    results = []
    hosts: dict[str, tuple[DiffusersHost, DiffusersHost]] = {}
    for model, case, (warmup, reps, per_rep) in PLAN:
        if args.no_sd15 and model.startswith("sd15"):
            continue
        spec = MODELS[model]
        if model not in hosts:
            hosts.clear()
            gc.collect()
            host = build_host(spec)
            hosts[model] = (host, twin_host(host))
        host, twin = hosts[model]
        data = work / f"data-{model}"
        if not data.exists():
            make_dataset(data, spec)
        cfg = make_config(spec, case, str(data), str(work / "out"))
        now, off = PivotalSide(cfg, host), switch_off(PivotalSide(cfg, twin))
        micro = tokenize_micro(now, off)
        load_before = load_average()
        timing = interleave_sides({"now": now, "before": off}, reps, warmup, per_rep)
        r = {"model": model, "case": case, "case_label": CASE_LABELS[case],
             "seconds_per_step": {k: quantiles(v) for k, v in timing.times.items()},
             "ratio": quantiles(timing.ratios), "ratios": timing.ratios,
             "loss_agreement": loss_agreement(timing.losses["now"], timing.losses["before"]),
             "tokenize_step_s": micro, "load_average_before": load_before, "load_average_after": load_average()}
        results.append(r)
        print(f"[optim_ab] {model} {case}: now/before {r['ratio']['median']:.3f} "
              f"({fmt_spread(r['ratio'])})", flush=True)
        del now, off, timing
        gc.collect()

    print_table(["model", "case", "before ms/step", "now ms/step", "now/before", "spread", "pairs",
                 "tokenize a step: before us", "now us", "loss max rel diff"],
                [[r["model"], r["case_label"], f"{r['seconds_per_step']['before']['median'] * 1000:.1f}",
                  f"{r['seconds_per_step']['now']['median'] * 1000:.1f}", f"{r['ratio']['median']:.3f}",
                  fmt_spread(r["ratio"]), r["ratio"]["n"],
                  f"{r['tokenize_step_s']['no memo']['median'] * 1e6:.0f}",
                  f"{r['tokenize_step_s']['memo']['median'] * 1e6:.0f}",
                  f"{r['loss_agreement']['max_rel']:.1e}"] for r in results],
                title="Step optimizations: Pivotal now vs with them switched off (interleaved)")
    write_json(args.json, {"benchmark": "optim_ab", "machine": machine_info(), "results": results,
                           "wall_s": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
