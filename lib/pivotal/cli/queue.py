"""``pivotal queue FOLDER``: train every config file of FOLDER one after another on one loaded model,
resumably (see :mod:`pivotal.training.queue`), then print a summary table.

Exit status: 0 every run completed, 1 a run failed or stopped, 2 refused (bad folder, model),
130 interrupted (Ctrl-C; the run is saved and the next call resumes it).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from pivotal.training.progress import ProgressEvent


def add_queue_command(sub: Any) -> None:
    """Register the ``queue`` subcommand on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("queue", help="train every config file (.toml/.json) of a folder, one after another; "
                                     "resumable, with a summary table")
    p.add_argument("folder", help="folder of settings files, one per run (paths in them are relative to it)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a diffusers model folder or a single-file .safetensors checkpoint")
    src.add_argument("--demo", choices=("sd1", "sdxl"), help="a tiny demo model (its demo settings are the base "
                     "of every config; a config without data_dir gets the synthetic demo dataset)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="one JSON line per finished run, then the summary")
    p.set_defaults(run=run_queue_command)


def _builder(demo: str | None) -> Any:
    from pivotal.demo.settings import DEMO_EMBEDDING, DEMO_SETTINGS
    from pivotal.training.config import EmbeddingSpec, TrainConfig
    from pivotal.training.queue import queue_config

    base: dict[str, Any] = {}
    if demo:
        base = {**DEMO_SETTINGS, "embeddings": [vars(EmbeddingSpec.parse(DEMO_EMBEDDING))]}

    def build(path: Path) -> TrainConfig:
        cfg = queue_config(path, base)
        if demo and not cfg.data_dir:
            from pivotal.demo.data import make_demo_dataset
            from pivotal.demo.world import EXAMPLE_CHARACTER

            folder = Path(cfg.out_dir) / "demo_data"
            if not folder.is_dir() or not any(folder.iterdir()):
                folder.mkdir(parents=True, exist_ok=True)
                make_demo_dataset(folder, [e.name for e in cfg.embeddings], seed=cfg.seed,
                                  character=EXAMPLE_CHARACTER)
            cfg.data_dir = str(folder)
        return cfg

    return build


def run_queue_command(args: argparse.Namespace, order: Callable[[list[Any]], list[Any]] | None = None,
                      after: Callable[[list[Any], Any], None] | None = None) -> int:
    """Run the queue of ``args.folder``; ``order``: how the final table lists the runs (a sweep
    ranks them by validation loss); ``after(runs, host)``: more work on the loaded model once the
    queue has run without interruption (a sweep's grid)."""
    from dataclasses import asdict

    from pivotal.demo.host import load_host
    from pivotal.training.queue import SUMMARY_FILE, QueueRun, find_configs, format_table, run_queue

    configs = find_configs(args.folder)  # a bad folder is refused before the model loads
    host = load_host(model=args.model, demo=args.demo, device=args.device)
    print(f"queue: {len(configs)} config(s) in {args.folder}, model {getattr(host, 'label', '')}", flush=True)
    stop = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("interrupt: saving the current run at its next step; run the queue again to resume",
              file=sys.stderr, flush=True)

    def on_event(config: str, e: ProgressEvent) -> None:
        if not args.json and (e.kind == "start" or (e.kind == "step" and (e.step % 50 == 0 or e.step == e.total))):
            loss = f"  loss {e.smoothed_loss:.4f}" if e.kind == "step" and e.smoothed_loss is not None else ""
            print(f"[{config}] {e.kind} {e.step}/{e.total}{loss}", flush=True)

    def on_run(run: QueueRun) -> None:
        if args.json:
            print(json.dumps({"event": "run", **asdict(run)}), flush=True)
        elif not run.skipped:
            print(f"[{run.config}] {run.status}: {run.bundle or run.message}", flush=True)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    try:
        runs = run_queue(args.folder, host, _builder(args.demo), on_event, stop, on_run)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    summary = Path(args.folder) / SUMMARY_FILE
    runs = order(runs) if order else runs
    if args.json:
        print(json.dumps({"event": "summary", "file": str(summary), "runs": [asdict(r) for r in runs]}), flush=True)
    else:
        print(format_table(runs))
        print(f"summary: {summary}")
    statuses = {r.status for r in runs}
    if "interrupted" in statuses or stop.is_set():
        return 130
    if after is not None:
        after(runs, host)
    return 0 if statuses == {"completed"} else 1
