"""``python -m pivotal`` as a user runs it: a real process, its exit status and its stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LIB = Path(__file__).resolve().parent.parent / "lib"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(LIB)}
    return subprocess.run([sys.executable, "-m", "pivotal", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_module_entry_invalid_file_exit_2_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "half.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    r = run("inspect", str(bad))
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"pivotal: error: {bad}: header claims 16 bytes but the file has "
                                             "only 5 after the size field (truncated download or write?)"]


def test_module_entry_version_and_usage() -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("pivotal ")
    r = run()
    assert r.returncode == 2 and "usage: pivotal" in r.stderr
