"""Run every benchmark, then record the figures in bench/RESULTS.md.

    .venv/bin/python bench/run_all.py                  # ~10 minutes on 2 CPU cores
    .venv/bin/python bench/run_all.py --wait-load 1.0  # first wait (up to 10 min) for a quiet machine

Each benchmark runs in its own process and writes ``bench/results/<name>.json``; this script
then rewrites the part of ``bench/RESULTS.md`` between the ``auto`` markers from those files (the
notes around the markers are kept). ``--only`` runs a subset and re-renders from whatever JSON
files are there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPTS = ("loss_parity", "step_time", "optim_ab", "memory", "loader")
BEGIN, END = "<!-- auto:begin (bench/run_all.py rewrites this part) -->", "<!-- auto:end -->"


def load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    waited = 0.0
    while load1() > threshold and waited < max_wait:
        print(f"[run_all] load {load1():.2f} > {threshold}; waiting ({waited:.0f}s so far)", flush=True)
        time.sleep(15)
        waited += 15
    return waited


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------
def _table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _ms(q) -> str:
    return f"{q['median'] * 1000:.1f}"


def render(results: dict[str, dict], runs: dict[str, dict]) -> str:
    any_result = next(iter(results.values()), {})
    m = any_result.get("machine", {})
    parts = [f"Last run: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, "
             f"`bench/run_all.py`, total {sum(r['wall_s'] for r in runs.values()):.0f} s.", ""]
    parts.append(_table(["machine", ""], [
        ["CPU", m.get("cpu")], ["cores (os.cpu_count)", m.get("cores")], ["torch threads", m.get("torch_threads")],
        ["GPU", m.get("cuda") or "none (CUDA code paths skipped)"],
        ["load average during the runs", "see the table below (1-minute average before / after each)"],
        ["torch / diffusers / transformers / peft",
         f"{m.get('torch')} / {m.get('diffusers')} / {m.get('transformers')} / {m.get('peft')}"],
        ["python", m.get("python")]]))
    parts.append("")
    parts.append(_table(["benchmark", "wall s", "torch threads", "load average (1 min) before", "after"],
                        [[k, f"{v['wall_s']:.0f}", v.get("threads", "?"), f"{v['load_before']:.2f}",
                          f"{v['load_after']:.2f}"] for k, v in runs.items()]))
    parts.append("\nThe machine is shared: other jobs ran during some of these runs (load above 2 on 2 cores "
                 "means contention). Interleaving cancels slow drift between the two sides; the spread "
                 "columns show what it could not cancel.")

    st = results.get("step_time")
    if st:
        parts.append("\n### Training step time (Pivotal / reference, median of interleaved pairs)\n")
        rows = []
        for r in st["results"]:
            s, q = r["seconds_per_step"], r["ratio"]
            gf = r.get("achieved_gflops") or {}
            rows.append([r["model_label"], r["case_label"], _ms(s["pivotal"]), _ms(s["reference"]),
                         f"**{q['median']:.3f}**", f"{q['q1']:.3f}–{q['q3']:.3f}", f"{q['min']:.3f}–{q['max']:.3f}",
                         q["n"], f"{r['loss_agreement']['max_rel']:.1e}",
                         f"{r['load_average_before'][0]:.1f}",
                         "/".join(f"{gf[k]:.0f}" for k in ("pivotal", "reference")) if gf else "–"])
        parts.append(_table(["model", "case", "Pivotal ms/step", "reference ms/step", "ratio", "IQR", "min–max",
                             "pairs", "loss max rel diff", "load", "GFLOP/s P/R"], rows))
    ab = results.get("optim_ab")
    if ab:
        parts.append("\n### Step optimizations: Pivotal now vs with them switched off (interleaved, same process)\n")
        parts.append(_table(["model", "case", "before ms/step", "now ms/step", "now / before", "IQR", "min–max",
                             "pairs", "tokenizing a step's captions: before µs", "now µs"],
                            [[r["model"], r["case_label"], _ms(r["seconds_per_step"]["before"]),
                              _ms(r["seconds_per_step"]["now"]), f"**{r['ratio']['median']:.3f}**",
                              f"{r['ratio']['q1']:.3f}–{r['ratio']['q3']:.3f}",
                              f"{r['ratio']['min']:.3f}–{r['ratio']['max']:.3f}", r["ratio"]["n"],
                              f"{r['tokenize_step_s']['no memo']['median'] * 1e6:.0f}",
                              f"{r['tokenize_step_s']['memo']['median'] * 1e6:.0f}"] for r in ab["results"]]))
    lp = results.get("loss_parity")
    if lp:
        parts.append(f"\n### Loss parity (first {lp['steps']} losses, tolerance {lp['tolerance']:.0e} relative)\n")
        parts.append(_table(["model", "case", "max abs diff", "max rel diff", "equal"],
                            [[r["model"], r["case_label"], f"{r['agreement']['max_abs']:.1e}",
                              f"{r['agreement']['max_rel']:.1e}", "yes" if r["pass"] else "NO"] for r in lp["runs"]]))
        parts.append("\nControls (the reference deliberately does different work; each should exceed the tolerance):\n")
        parts.append(_table(["control", "model", "max rel diff", "above tolerance"],
                            [[r["control"], r["model"], f"{r['agreement']['max_rel']:.1e}",
                              "yes" if r["detected"] else "no"] for r in lp["controls"]]))
    mem = results.get("memory")
    if mem:
        parts.append(f"\n### Memory over a loaded model ({mem['model']}, {mem['steps']} steps, one process each)\n")
        copy = mem.get("second_copy_mib")
        labels = {"pivotal": "Pivotal training run (UNet LoRA + 2 emb)", "pivotal_te": "Pivotal training run + TE LoRA",
                  "reference": "reference training run (peft + TI matrix)", "second_copy": "loading a second copy"}
        rows = []
        for r in mem["results"]:
            add = r["added_peak_mib"]
            rows.append([labels[r["mode"]], f"{r['rss_loaded_mib']:.0f}", f"{r['peak_mib']:.0f}",
                         "–" if add is None else f"{add:.0f}", f"{r['added_at_end_mib']:.0f}",
                         "–" if (add is None or not copy) else f"{add / copy:.2f}"])
        parts.append(_table(["after loading the model", "RSS loaded MiB", "peak RSS MiB", "added at peak MiB",
                             "added at end MiB", "× second copy"], rows))
        ref = next((r for r in mem["results"] if r["mode"] == "reference"), None)
        if ref and "pivotal_trainable_params" in ref:
            parts.append(f"\nTrainable parameters: Pivotal {ref['pivotal_trainable_params'] / 1e6:.2f} M (LoRA + "
                         f"embeddings), reference {ref['reference_trainable_params'] / 1e6:.2f} M (LoRA + the "
                         "whole token-embedding matrix); each costs 4× in fp32 with gradients and AdamW's moments.")
    ld = results.get("loader")
    if ld:
        g, s = ld["generation"], ld["scan"]
        parts.append(f"\n### Bundle loader ({g['bundles_on_disk']} bundles on disk, demo SD1 at 64 px, "
                     f"{g['gen_steps']} steps with CFG, {g['reps']} interleaved reps)\n")
        parts.append(_table(["generation", "median ms", "added vs no tag, median ms"],
                            [[k, _ms(q), _ms(g["added_s"][k]) if k in g["added_s"] else "–"]
                             for k, q in g["generation_s"].items()]))
        parts.append("")
        parts.append(_table(["loader piece (one tag)", "median ms"], [[k, f"{q['median'] * 1000:.2f}"]
                                                                      for k, q in g["pieces_s"].items()]))
        parts.append(f"\nScan of {s['files']} bundle files ({s['file_bytes_mean'] / 1024:.0f} KiB each; the header "
                     f"scan read {(s['bytes_read_per_file_header_scan'] or 0) / 1024:.1f} KiB per file — one "
                     "buffered read — not the tensors):\n")
        parts.append(_table(["scan", "median ms", "per file µs"],
                            [[k, _ms(s[key]), f"{s[key]['median'] / s['files'] * 1e6:.0f}"] for k, key in (
                                ("name_registry.bundle_embedding_names, every file", "bundle_embedding_names_s"),
                                ("name_registry.lora_folder_names(folder)", "lora_folder_names_s"),
                                ("read_bundle, every file (whole file, for comparison)", "read_bundle_all_s"))]))
    return "\n".join(parts) + "\n"


def write_results_md(results_dir: Path, runs: dict[str, dict]) -> Path:
    results = {}
    for name in SCRIPTS:
        p = results_dir / f"{name}.json"
        if p.is_file():
            results[name] = json.loads(p.read_text(encoding="utf-8"))
    runs_path = results_dir / "runs.json"
    old_runs = json.loads(runs_path.read_text()) if runs_path.is_file() else {}
    old_runs.update(runs)
    runs_path.write_text(json.dumps(old_runs, indent=2) + "\n")
    body = render(results, {k: old_runs[k] for k in SCRIPTS if k in old_runs})
    md = HERE / "RESULTS.md"
    text = md.read_text(encoding="utf-8") if md.is_file() else "# Benchmark results\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + "\n\n" + BEGIN + "\n" + END + "\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    md.write_text(head + BEGIN + "\n" + body + END + tail, encoding="utf-8")
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=SCRIPTS, default=list(SCRIPTS))
    ap.add_argument("--results", default=str(HERE / "results"), help="folder for the JSON files")
    ap.add_argument("--wait-load", type=float, default=0.0,
                    help="before each benchmark, wait (up to --max-wait s) until the 1-minute load is below this")
    ap.add_argument("--max-wait", type=float, default=600.0)
    ap.add_argument("--no-md", action="store_true", help="do not rewrite RESULTS.md")
    ap.add_argument("--threads", default="auto",
                    help="torch threads in every benchmark: a number, or 'auto' (default): all cores when the "
                         "1-minute load average is below 1 when the run starts, else 1 (see _common.resolve_threads)")
    args = ap.parse_args(argv)

    if args.wait_load:
        wait_for_quiet(args.wait_load, args.max_wait)
    sys.path.insert(0, str(HERE))
    from _common import THREADS_ENV, resolve_threads

    threads = resolve_threads(args.threads)
    env = dict(os.environ, **{THREADS_ENV: str(threads)})
    print(f"[run_all] torch threads {threads} (load {load1():.2f}, {os.cpu_count()} cores)", flush=True)
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs: dict[str, dict] = {}
    failed = []
    for name in args.only:
        waited = wait_for_quiet(args.wait_load, args.max_wait) if args.wait_load and name != args.only[0] else 0.0
        print(f"\n===== {name} (load {load1():.2f}) =====", flush=True)
        before, t0 = load1(), time.perf_counter()
        proc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), "--json", str(results_dir / f"{name}.json")],
                              cwd=ROOT, env=env)
        runs[name] = {"wall_s": time.perf_counter() - t0, "load_before": before, "load_after": load1(),
                      "waited_s": waited, "returncode": proc.returncode, "threads": threads}
        if proc.returncode != 0:
            failed.append(name)
    total = time.perf_counter() - started
    print(f"\n[run_all] total {total:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    if not args.no_md:
        print(f"[run_all] wrote {write_results_md(results_dir, runs)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
