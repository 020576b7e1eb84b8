"""Training-step time: Pivotal against the straightforward reference, interleaved in one process.

For each model and case both sides are built over the same host weights, from the same initial
LoRA / embedding values, on the same micro-batches (fixed latents + captions), with the same
noise and timesteps. After ``--warmup`` untimed steps per side, ``--reps`` timed runs of
``steps_per_rep`` steps alternate between the sides (P R, R P, P R, ...); the ratio of each
adjacent pair is Pivotal / reference, and the table shows the median ratio with its spread.
The losses of both sides are compared too: equal losses mean equal work.

    .venv/bin/python bench/step_time.py --json bench/results/step_time.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (  # noqa: E402
    CASE_LABELS,
    CASES,
    GPU_MODELS,
    MODELS,
    add_threads_arg,
    apply_threads,
    build_host,
    fmt_spread,
    interleaved,
    load_average,
    loss_agreement,
    machine_info,
    make_pair,
    print_table,
    quantiles,
    write_json,
)
from pivotal.hosts.diffusers.host import DiffusersHost  # noqa: E402

#: model key -> (warm-up steps per side, timed pairs, steps per timed run)
PLANS = {"sd1-tiny": (3, 12, 4), "sdxl-tiny": (3, 12, 4), "sd15-arch": (1, 5, 1),
         "sd15-arch-512": (2, 8, 2), "sdxl-arch-1024": (2, 6, 2)}
QUICK = {"sd1-tiny": (1, 4, 2), "sdxl-tiny": (1, 4, 2), "sd15-arch": (1, 2, 1),
         "sd15-arch-512": (1, 2, 1), "sdxl-arch-1024": (1, 2, 1)}


def run_case(host: DiffusersHost, model: str, case: str, work: Path, plan: tuple[int, int, int],
             count: bool = False) -> dict:
    warmup, reps, per_rep = plan
    spec = MODELS[model]
    total = warmup + reps * per_rep
    pair = make_pair(spec, case, host, work, total)
    load_before = load_average()
    started = time.perf_counter()
    timing = interleaved(pair, reps, warmup, per_rep, count_flops=count)
    wall = time.perf_counter() - started
    agree = loss_agreement(timing.losses["pivotal"], timing.losses["reference"])
    flops = timing.flops
    result = {
        "model": model, "model_label": spec.label, "case": case, "case_label": CASE_LABELS[case],
        "plan": {"warmup_steps": warmup, "timed_pairs": reps, "steps_per_rep": per_rep},
        "seconds_per_step": {k: quantiles(v) for k, v in timing.times.items()},
        "ratio": quantiles(timing.ratios), "ratios": timing.ratios, "times": timing.times,
        "loss_agreement": agree, "losses": timing.losses, "wall_s": wall,
        "load_average_before": load_before, "load_average_after": load_average(),
        "cuda_peak_mib": timing.cuda_peak_mib or None, "flops_per_step": flops,
        "achieved_gflops": {k: flops[k] / timing_q / 1e9 for k, timing_q in
                            ((k, quantiles(timing.times[k])["median"]) for k in flops)} if flops else {},
    }
    del pair, timing
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--models", nargs="+", choices=list(MODELS),
                    help="default: every CPU model, plus SD's native sizes (512 px SD1.5, 1024 px SDXL) with CUDA")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke test, not a measurement)")
    ap.add_argument("--reps", type=int, help="timed pairs per case (overrides the plan)")
    add_threads_arg(ap)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    if not args.models:
        args.models = [m for m in MODELS if m not in GPU_MODELS or torch.cuda.is_available()]

    results = []
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pivotal-bench-"))
    for model in args.models:
        t0 = time.perf_counter()
        host = build_host(MODELS[model])
        build_s = time.perf_counter() - t0
        warmup, reps, per_rep = (QUICK if args.quick else PLANS)[model]
        plan = (warmup, args.reps or reps, per_rep)
        for case in args.cases:
            r = run_case(host, model, case, work, plan, count=model == "sd15-arch" or torch.cuda.is_available())
            r["model_build_s"] = build_s
            results.append(r)
            s = r["seconds_per_step"]
            print(f"[step_time] {model} {case}: pivotal {s['pivotal']['median']:.3f}s reference "
                  f"{s['reference']['median']:.3f}s ratio {r['ratio']['median']:.3f} "
                  f"(load {r['load_average_before'][0]:.2f})", flush=True)
        del host
        gc.collect()

    rows = []
    for r in results:
        s = r["seconds_per_step"]
        rows.append([r["model"], r["case_label"], f"{s['pivotal']['median'] * 1000:.1f}",
                     f"{s['reference']['median'] * 1000:.1f}", f"{r['ratio']['median']:.3f}", fmt_spread(r["ratio"]),
                     r["ratio"]["n"], f"{r['loss_agreement']['max_rel']:.1e}",
                     "/".join(f"{r['achieved_gflops'][k]:.0f}" for k in ("pivotal", "reference"))
                     if r["achieved_gflops"] else "-",
                     "/".join(f"{r['cuda_peak_mib'][k]:.0f}" for k in ("pivotal", "reference"))
                     if r["cuda_peak_mib"] else "-"])
    print_table(["model", "case", "pivotal ms/step", "reference ms/step", "ratio P/R", "spread of ratio",
                 "pairs", "loss max rel diff", "GFLOP/s P/R", "CUDA peak MiB P/R"], rows,
                title="Training step time, Pivotal vs reference "
                      "(median of interleaved pairs; lower ratio = Pivotal faster)")
    payload = {"benchmark": "step_time", "machine": machine_info(), "results": results,
               "wall_s": time.perf_counter() - started, "quick": args.quick}
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
