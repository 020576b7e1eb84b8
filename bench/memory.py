"""Memory at rest: what training in-process adds to a loaded model, against a second copy of it.

Each measurement runs in its own subprocess, so peaks are clean. Model: the SD1.5 architecture
with random weights (diffusers' SD1.5 UNet, CLIP ViT-L/14 text encoder, SD's VAE), fp32.

* ``pivotal``: load the model, then ``pivotal.training.trainer.train`` for ``--steps`` steps at 256 px,
  batch 1, UNet LoRA + 2 embeddings (dataset pre-flight, latent cache, the steps, the bundle
  and resume file written at the end);
* ``pivotal_te``: the same with text-encoder LoRA;
* ``reference``: load the model, then the same steps by the straightforward reference
  (``_common.ReferenceSide``: peft LoRA, textual inversion over the whole embedding matrix);
* ``second_copy``: load the model, then load it again.

Resident memory comes from /proc/self/status (VmRSS now, VmHWM peak). After loading, the peak
is reset (``echo 5 > /proc/self/clear_refs``) when the kernel allows it, so the reported peak is
the peak *of the phase after loading*; where it cannot be reset the peak includes loading, and
the JSON says so. On CUDA, ``torch.cuda.max_memory_allocated`` is recorded the same way.

    .venv/bin/python bench/memory.py --json bench/results/memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from _common import (  # noqa: E402
    ROOT,
    ModelSpec,
    add_threads_arg,
    apply_threads,
    cuda_peak_mib,
    cuda_peak_reset,
    load_average,
    machine_info,
    make_config,
    make_dataset,
    make_pair,
    print_table,
    rss_mib,
    write_json,
)

SPEC = ModelSpec("sd15-arch", "sd1", 256, 1, "SD1.5 architecture (random, full VAE), 256 px, batch 1")
MODES = ("pivotal", "pivotal_te", "reference", "second_copy")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def load_model():
    from _common import sd15_parts
    from pivotal.hosts.diffusers.host import DiffusersHost

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts = sd15_parts(0, full_vae=True)
    for m in (parts.unet, parts.vae, *parts.text_encoders.values()):
        m.to(dev)
    return DiffusersHost(parts, label=SPEC.label)


def child(mode: str, steps: int) -> dict:
    gc.collect()
    before = rss_mib()
    t0 = time.perf_counter()
    host = load_model()
    gc.collect()
    loaded = rss_mib()
    out: dict = {"mode": mode, "rss_start_mib": before["VmRSS"], "rss_loaded_mib": loaded["VmRSS"],
                 "peak_during_load_mib": loaded["VmHWM"], "load_s": time.perf_counter() - t0,
                 "cuda_loaded_mib": torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None}
    out["peak_reset"] = reset_peak()
    cuda_peak_reset()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pivotal-mem-"))
    if mode == "second_copy":
        host2 = load_model()
        gc.collect()
        out["extra_objects"] = type(host2).__name__
    elif mode in ("pivotal", "pivotal_te"):
        from pivotal.training.trainer import train

        data = make_dataset(work / "data", SPEC, count=2)
        cfg = make_config(SPEC, "pivotal_te_lora" if mode == "pivotal_te" else "pivotal", data, str(work / "out"),
                          steps=steps)
        result = train(cfg, host)
        out["status"] = result.status
        out["losses"] = result.losses
    elif mode == "reference":
        make_dataset(work / f"data-{SPEC.key}", SPEC, count=2)  # the same 2 images as the Pivotal runs
        pair = make_pair(SPEC, "pivotal", host, work, steps)
        # Trainable sizes of both sides: each costs 4x fp32 (weights, grads, AdamW's two moments).
        out["pivotal_trainable_params"] = (sum(p.numel() for p in pair.pivotal.net.parameters())
                                           + sum(p.numel() for p in pair.pivotal.embeddings.parameters()))
        out["reference_trainable_params"] = sum(p.numel() for g in pair.reference.optimizer.param_groups
                                                for p in g["params"])
        losses = []
        with pair.reference:
            for _ in range(steps):
                losses.append(pair.reference.step())
        out["losses"] = losses
    else:
        raise SystemExit(f"unknown mode {mode}")
    gc.collect()
    after = rss_mib()
    out.update({"phase_s": time.perf_counter() - t0, "rss_after_mib": after["VmRSS"], "peak_mib": after["VmHWM"],
                "cuda_peak_mib": cuda_peak_mib()})
    # What the phase added on top of the loaded model, at its peak.
    out["added_peak_mib"] = after["VmHWM"] - loaded["VmRSS"] if out["peak_reset"] else None
    out["added_at_end_mib"] = after["VmRSS"] - loaded["VmRSS"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--steps", type=int, default=2, help="training steps (the peak is reached in the second: "
                                                            "the first allocates AdamW's state)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    add_threads_arg(ap)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps)), flush=True)
        return 0

    started = time.perf_counter()
    results = []
    for mode in args.modes:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", mode,
                               "--steps", str(args.steps)],
                              cwd=ROOT, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"memory child {mode} failed ({proc.returncode})")
        r = json.loads(line[len("RESULT "):])
        results.append(r)
        print(f"[memory] {mode}: loaded {r['rss_loaded_mib']:.0f} MiB, added at peak "
              f"{r['added_peak_mib'] if r['added_peak_mib'] is not None else float('nan'):.0f} MiB", flush=True)

    by = {r["mode"]: r for r in results}
    copy_cost = by["second_copy"]["added_peak_mib"] if "second_copy" in by else None
    labels = {"pivotal": "Pivotal training run (UNet LoRA + 2 emb)", "pivotal_te": "Pivotal training run + TE LoRA",
              "reference": "reference training run (peft + TI matrix)", "second_copy": "loading a second copy"}
    rows = []
    for r in results:
        add = r["added_peak_mib"]
        rows.append([labels[r["mode"]], f"{r['rss_loaded_mib']:.0f}", f"{r['peak_mib']:.0f}",
                     "-" if add is None else f"{add:.0f}", f"{r['added_at_end_mib']:.0f}",
                     "-" if (add is None or not copy_cost) else f"{add / copy_cost:.2f}",
                     "-" if r["cuda_peak_mib"] is None else f"{r['cuda_peak_mib']:.0f}"])
    print_table(["what runs after the model is loaded", "RSS loaded MiB", "peak RSS MiB", "added at peak MiB",
                 "added at end MiB", "x second copy", "CUDA peak MiB"], rows,
                title=f"Memory over a loaded {SPEC.label}, {args.steps} training steps (separate processes)")
    write_json(args.json, {"benchmark": "memory", "machine": machine_info(), "model": SPEC.label,
                           "steps": args.steps, "results": results, "second_copy_mib": copy_cost,
                           "load_average_end": load_average(), "wall_s": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
