"""Fuzzing the reader with mutated real bundles (tests/fuzz_bundles.py): whatever the file, every
entry point either reads it or raises a PivotalError whose message is one line naming the file.

The plain suite runs a fixed, derandomized slice (a few seconds). CI runs the long one with
``pytest -m fuzz`` (``PIVOTAL_FUZZ_EXAMPLES`` examples, default 4000); a failure prints the
shrunk input, which then belongs in tests/crash_files.py as a regression test.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_bundles import mutated_bundle
from pivotal.errors import PivotalError
from pivotal.formats.inspect_report import format_report, inspect_bundle
from pivotal.formats.name_registry import bundle_embedding_names, lora_folder_names
from pivotal.webui.bundle_loader import BundleIndex, parse_bundle_embeddings


def _entry_points() -> list[Callable[[Path], object]]:
    def inspect_text(p: Path) -> object:
        report = inspect_bundle(p)
        json.dumps(report, ensure_ascii=False)
        return format_report(report)

    return [inspect_text, bundle_embedding_names, lambda p: parse_bundle_embeddings(str(p))]


def check_file(folder: Path, blob: bytes) -> None:
    """Every reader either succeeds or refuses with a one-line PivotalError naming the file."""
    path = folder / "fuzz.safetensors"
    path.write_bytes(blob)
    for read in _entry_points():
        try:
            out = read(path)
        except PivotalError as e:
            message = str(e)
            assert "\n" not in message and message.startswith(str(path)), message
        else:
            if isinstance(out, str):
                assert "\x1b" not in out
    taken, _ = lora_folder_names(folder)  # the scans never raise
    assert "fuzz" in taken
    BundleIndex().scan(str(folder))


@pytest.fixture(scope="module")
def folder() -> Path:
    d = Path(tempfile.mkdtemp(prefix="pivotal-fuzz-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


QUICK = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])
LONG = settings(max_examples=int(os.environ.get("PIVOTAL_FUZZ_EXAMPLES", "4000")), deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@QUICK
@given(blob=mutated_bundle())
def test_reader_quick_slice(folder: Path, blob: bytes) -> None:
    check_file(folder, blob)


@pytest.mark.fuzz
@pytest.mark.slow
@LONG
@given(blob=mutated_bundle())
def test_reader_fuzz_long(folder: Path, blob: bytes) -> None:
    check_file(folder, blob)
