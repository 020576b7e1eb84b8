"""Machine facts, threads, statistics and output shared by the benchmark scripts (no models here)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

#: Intra-op threads for every benchmark process, set by ``run_all.py`` (or ``--threads``).
THREADS_ENV = "PIVOTAL_BENCH_THREADS"


def resolve_threads(value: str | int | None) -> int:
    """``auto``: every core when the machine is quiet (1-minute load below 1), else 1 thread.

    On a shared machine, torch's OpenMP threads wait for each other at every parallel region; when
    another job holds a core that turns a 75 ms step into seconds (measured here: 60x). One thread
    per process time-slices cleanly, so the comparison stays meaningful, just slower."""
    if value in (None, "", "auto"):
        return (os.cpu_count() or 1) if load_average()[0] < 1.0 else 1
    return max(1, int(value))


def apply_threads(value: str | int | None = None) -> int:
    """Set torch's thread count from ``value``, else ``$PIVOTAL_BENCH_THREADS``, else torch's default."""
    chosen = value if value is not None else os.environ.get(THREADS_ENV)
    if chosen is None:
        return torch.get_num_threads()
    n = resolve_threads(chosen)
    torch.set_num_threads(n)
    os.environ[THREADS_ENV] = str(n)  # children (memory.py) inherit it
    return n


def add_threads_arg(ap) -> None:
    ap.add_argument("--threads", help="torch threads: a number or 'auto' (all cores when the load average "
                                      f"is below 1, else 1); default ${THREADS_ENV}, else torch's default")



# ---------------------------------------------------------------------------------------------
# machine and reporting
# ---------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for mod in ("diffusers", "transformers", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - report what is there
            info[mod] = None
    return info


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """median, IQR (q1, q3), min, max of ``values``."""
    vals = sorted(values)
    if not vals:
        return {}
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    return {"median": statistics.median(vals), "q1": q1, "q3": q3, "min": vals[0], "max": vals[-1], "n": len(vals)}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


def rss_mib() -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, MiB."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) / 1024
    except OSError:
        import resource

        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out



def cuda_peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def cuda_peak_mib() -> float | None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return None
