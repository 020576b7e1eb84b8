"""GPU training-step benchmark: Pivotal against the reference at SD's native sizes (``bench/gpu.sh``).

Models (random weights, built on the GPU): the SD1.5 architecture at 512 px, batch 1 and 4, and the
SDXL architecture at 1024 px, batch 1 (the tiny demo models at 64 px with ``--quick``, on CPU,
where every variant trains in fp32: CPU autocast runs slow reference kernels).
For each, four variants, each an interleaved Pivotal / reference pair over the same weights, data,
noise and timesteps (the machinery of ``step_time.py``):

* ``fp16``: autocast fp16 (GradScaler), PyTorch SDPA attention, no checkpointing;
* ``bf16``: autocast bf16;
* ``bf16 + checkpointing``: gradient checkpointing on (both sides, as the diffusers examples do it);
* ``bf16, no SDPA``: the UNet's attention as plain matmul + softmax (diffusers' ``AttnProcessor``).

Per variant: median seconds per step of each side, their ratio, the peak CUDA memory each side
allocated (weights included), and the model FLOPs utilisation: the FLOPs of one Pivotal step
without checkpointing (torch's FlopCounterMode: matmuls, convolutions, SDPA), divided by the step
time and by the GPU's dense bf16/fp16 peak (``PEAK_TFLOPS``, or ``--peak-tflops``). The figures go
to ``--json`` and to the ``gpu`` section of ``bench/RESULTS.md`` (``--results``; ``--quick``
writes no results file unless given one).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (  # noqa: E402
    MODELS,
    ModelSpec,
    add_threads_arg,
    apply_threads,
    build_host,
    interleaved,
    loss_agreement,
    machine_info,
    make_pair,
    print_table,
    quantiles,
    write_json,
)

BEGIN, END = "<!-- gpu:begin (bench/gpu.sh rewrites this part) -->", "<!-- gpu:end -->"
#: Dense (no sparsity) bf16 / fp16 tensor-core peak, TFLOP/s, by a substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10G": 70.0, "RTX 4090": 165.0, "RTX 3090": 71.0}
#: (model spec, the spec of step_time.py it is sized like)
GPU_PLAN = [ModelSpec("sd15-512-b1", "sd1", 512, 1, "SD1.5 architecture, 512 px, batch 1"),
            ModelSpec("sd15-512-b4", "sd1", 512, 4, "SD1.5 architecture, 512 px, batch 4"),
            ModelSpec("sdxl-1024-b1", "sdxl", 1024, 1, "SDXL architecture, 1024 px, batch 1")]
QUICK_PLAN = [ModelSpec("sd1-tiny-b1", "sd1", 64, 1, "tiny SD1 (demo), 64 px, batch 1"),
              ModelSpec("sd1-tiny-b2", "sd1", 64, 2, "tiny SD1 (demo), 64 px, batch 2"),
              ModelSpec("sdxl-tiny-b1", "sdxl", 64, 1, "tiny SDXL (demo), 64 px, batch 1")]
#: variant -> TrainConfig overrides and whether the UNet uses SDPA
VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    "fp16": ({"precision": "fp16"}, True),
    "bf16": ({"precision": "bf16"}, True),
    "bf16 + checkpointing": ({"precision": "bf16", "gradient_checkpointing": True}, True),
    "bf16, no SDPA": ({"precision": "bf16"}, False),
}
#: (warm-up steps per side, timed pairs, steps per timed run)
PLAN, QUICK = (2, 4, 2), (1, 1, 1)


def peak_tflops(name: str | None, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_TFLOPS.items():
        if name and key in name:
            return value
    return None


def set_attention(unets: list[torch.nn.Module], sdpa: bool) -> list[dict[str, Any]]:
    """Switch the UNets' attention to SDPA (``AttnProcessor2_0``) or plain (``AttnProcessor``);
    returns their processors before, for :func:`restore_attention`."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    before = [dict(u.attn_processors) for u in unets]
    for u in unets:
        u.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())
    return before


def restore_attention(unets: list[torch.nn.Module], before: list[dict[str, Any]]) -> None:
    for u, procs in zip(unets, before):
        u.set_attn_processor(procs)


def build(spec: ModelSpec, device: str) -> Any:
    """The host for a plan entry: the full-size architectures are built on ``device``."""
    if spec.base == "sd1" and spec.resolution >= 512:
        from _arch import sd15_parts
        from pivotal.hosts.diffusers.host import DiffusersHost

        parts = sd15_parts(0, device=device)
        for m in (parts.unet, parts.vae, *parts.text_encoders.values()):
            m.to(device)
        return DiffusersHost(parts, label=spec.label)
    if spec.base == "sdxl" and spec.resolution >= 1024:
        return build_host(MODELS["sdxl-arch-1024"], device=device)
    return build_host(MODELS[f"{spec.base}-tiny"], device=device)


def run_variant(host: Any, spec: ModelSpec, variant: str, work: Path, plan: tuple[int, int, int],
                count: bool) -> dict[str, Any]:
    overrides, sdpa = VARIANTS[variant]
    if host.device.type == "cpu":
        # CPU autocast in fp16 / bf16 runs reference kernels, hundreds of times slower than fp32:
        # the smoke test keeps every other setting of the variant and trains in fp32.
        overrides = {**overrides, "precision": "fp32"}
    warmup, reps, per_rep = plan
    pair = make_pair(spec, "pivotal", host, work, warmup + reps * per_rep, **overrides)
    before = set_attention([host.unet, pair.reference.unet], sdpa)
    try:
        timing = interleaved(pair, reps, warmup, per_rep, count_flops=count)
    finally:
        restore_attention([host.unet, pair.reference.unet], before)
    result = {"model": spec.key, "model_label": spec.label, "batch": spec.batch_size, "variant": variant,
              "seconds_per_step": {k: quantiles(v) for k, v in timing.times.items()},
              "ratio": quantiles(timing.ratios), "loss_agreement": loss_agreement(timing.losses["pivotal"],
                                                                                  timing.losses["reference"]),
              "cuda_peak_mib": timing.cuda_peak_mib or None, "flops_per_step": timing.flops}
    del pair, timing
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def render(results: list[dict[str, Any]], machine: dict[str, Any], peak: float | None, wall: float,
           skipped: list[str]) -> str:
    """The Markdown of the gpu section."""
    device = machine.get("cuda") or "CPU (smoke test, not a GPU figure)"
    lines = [BEGIN, "### GPU training step (`bench/gpu.sh`)", "",
             f"{device}; torch {machine.get('torch')}; {time.strftime('%Y-%m-%d')}; {wall / 60:.1f} min. "
             "Pivotal (P) against the reference (R), interleaved pairs, random weights, UNet LoRA rank 8 "
             "+ 2 embeddings. MFU: model FLOPs of a step without checkpointing / step time / "
             + (f"{peak:.0f} TFLOP/s dense peak." if peak else "peak (unknown for this device).")
             + (" On the CPU every variant trains in fp32." if not machine.get("cuda") else ""), "",
             "| model | variant | P ms/step | R ms/step | P/R | peak MiB P/R | MFU P/R | loss rel diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["seconds_per_step"]
        p, ref = s["pivotal"]["median"], s["reference"]["median"]
        mem = "/".join(f"{r['cuda_peak_mib'][k]:.0f}" for k in ("pivotal", "reference")) if r["cuda_peak_mib"] else "-"
        mfu = "-"
        if peak and r.get("model_flops"):
            mfu = "/".join(f"{r['model_flops'] / t / (peak * 1e12):.1%}" for t in (p, ref))
        lines.append(f"| {r['model_label']} | {r['variant']} | {p * 1000:.1f} | {ref * 1000:.1f} | "
                     f"{r['ratio']['median']:.3f} | {mem} | {mfu} | {r['loss_agreement']['max_rel']:.1e} |")
    if skipped:
        lines += ["", f"Skipped (over the time budget): {', '.join(skipped)}."]
    return "\n".join(lines + ["", END])


def write_section(path: Path, section: str) -> None:
    """Replace the gpu section of ``path`` (or put it before the hand-written notes / at the end)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    elif "\n## Notes" in text:
        head, tail = text.split("\n## Notes", 1)
        text = head.rstrip("\n") + "\n\n" + section + "\n\n## Notes" + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny demo models at 64 px, one timed pair (CPU is fine)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--results", help="Markdown file whose gpu section to rewrite (default: bench/RESULTS.md, "
                                      "none with --quick)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when it is not in the table")
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds; variants not started by then are skipped and listed (default 420: the run "
                         "stays within 8 minutes)")
    add_threads_arg(ap)
    args = ap.parse_args(argv)
    # The CPU smoke test on one thread: on a busy machine several threads wait on each other.
    apply_threads(args.threads if args.threads is not None else ("1" if args.quick else None))
    if not args.quick and not torch.cuda.is_available():
        print("gpu.py: no CUDA device; run with --quick for the CPU smoke test", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = machine_info()
    peak = peak_tflops(machine.get("cuda"), args.peak_tflops) if device == "cuda" else None
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pivotal-gpu-bench-"))
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    for spec in QUICK_PLAN if args.quick else GPU_PLAN:
        if time.perf_counter() - started > args.budget:
            skipped += [f"{spec.key} {v}" for v in args.variants]
            continue
        t0 = time.perf_counter()
        host = build(spec, device)
        print(f"[gpu] {spec.label}: built in {time.perf_counter() - t0:.0f}s", flush=True)
        flops = 0.0
        for i, variant in enumerate(args.variants):
            if time.perf_counter() - started > args.budget:
                skipped.append(f"{spec.key} {variant}")
                continue
            # FLOPs once per model, on the first variant (checkpointing recomputes, which model
            # FLOPs do not count; the other variants do the same model work)
            r = run_variant(host, spec, variant, work, QUICK if args.quick else PLAN, count=i == 0)
            flops = flops or float(r["flops_per_step"].get("pivotal", 0.0))
            r["model_flops"] = flops
            results.append(r)
            s = r["seconds_per_step"]
            print(f"[gpu] {spec.key} {variant}: pivotal {s['pivotal']['median'] * 1000:.1f} ms, reference "
                  f"{s['reference']['median'] * 1000:.1f} ms, peak MiB {r['cuda_peak_mib']}", flush=True)
        del host
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    wall = time.perf_counter() - started
    print_table(["model", "variant", "P ms/step", "R ms/step", "P/R"],
                [[r["model"], r["variant"], f"{r['seconds_per_step']['pivotal']['median'] * 1000:.1f}",
                  f"{r['seconds_per_step']['reference']['median'] * 1000:.1f}", f"{r['ratio']['median']:.3f}"]
                 for r in results], title="GPU training step")
    write_json(args.json, {"benchmark": "gpu", "machine": machine, "peak_tflops": peak, "quick": args.quick,
                           "results": results, "skipped": skipped, "wall_s": wall})
    target = args.results or (None if args.quick else str(Path(__file__).resolve().parent / "RESULTS.md"))
    if target:
        write_section(Path(target), render(results, machine, peak, wall, skipped))
        print(f"[gpu] wrote the gpu section of {target}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
