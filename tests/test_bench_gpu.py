"""``bench/gpu.sh --quick``: the GPU benchmark's CPU smoke test runs every model and variant, both
sides do the same work in each (equal losses), and it rewrites only its own section of a results
file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers", reason="the benchmark runs the standalone diffusers host")
pytest.importorskip("peft", reason="the reference side uses peft")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu  # noqa: E402


@pytest.mark.slow
def test_quick_run_covers_every_model_and_variant(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nintro\n\n## Notes\n\nkept\n", encoding="utf-8")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--quick", "--json", str(tmp_path / "gpu.json"),
                           "--results", str(results)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["quick"] is True and doc["skipped"] == []
    runs = {(r["model"], r["variant"]) for r in doc["results"]}
    assert runs == {(spec.key, v) for spec in gpu.QUICK_PLAN for v in gpu.VARIANTS}
    for r in doc["results"]:
        # fp32 on the CPU: both sides do the same arithmetic, checkpointing and attention kind included
        assert r["loss_agreement"]["max_rel"] < 1e-4, r
        assert r["model_flops"] > 0 and r["seconds_per_step"]["pivotal"]["median"] > 0
    text = results.read_text()
    assert text.count(gpu.BEGIN) == 1 and text.count(gpu.END) == 1
    assert text.startswith("# Benchmark results\n\nintro") and text.rstrip().endswith("kept")
    assert text.index(gpu.END) < text.index("## Notes")
    assert "tiny SDXL (demo), 64 px, batch 1 | bf16, no SDPA |" in text


def test_section_is_replaced_not_added(tmp_path: Path) -> None:
    path = tmp_path / "R.md"
    path.write_text(f"# R\n\n{gpu.BEGIN}\nold\n{gpu.END}\n\n## Notes\n\nhand\n", encoding="utf-8")
    gpu.write_section(path, f"{gpu.BEGIN}\nnew\n{gpu.END}")
    assert path.read_text() == f"# R\n\n{gpu.BEGIN}\nnew\n{gpu.END}\n\n## Notes\n\nhand\n"
    fresh = tmp_path / "fresh.md"
    gpu.write_section(fresh, f"{gpu.BEGIN}\nx\n{gpu.END}")
    assert fresh.read_text().count(gpu.BEGIN) == 1


def test_peak_table() -> None:
    assert gpu.peak_tflops("NVIDIA H200", None) == 989.0
    assert gpu.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gpu.peak_tflops("Some GPU", None) is None and gpu.peak_tflops("Some GPU", 100.0) == 100.0
