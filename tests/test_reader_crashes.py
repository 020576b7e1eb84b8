"""Every file that once crashed the reader is refused with one line naming it (exit 2), and a folder
holding such files still lists, registers and generates with its good bundles."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from crash_files import CRASH_FILES, READABLE, good_bundle_bytes
from pivotal.cli.main import main
from pivotal.errors import BundleError
from pivotal.formats.bundle import read_bundle
from pivotal.formats.name_registry import lora_folder_names
from pivotal.formats.safetensors_io import read_header
from pivotal.ui.bundle_list import find_bundles
from pivotal.webui.api import list_bundles


@pytest.mark.parametrize("case", sorted(CRASH_FILES))
def test_inspect_one_line_exit_2(tmp_path: Path, case: str, capsys: Any) -> None:
    path = CRASH_FILES[case](tmp_path)
    rc = main(["inspect", str(path)])
    out, err = capsys.readouterr()
    if case in READABLE:
        # hostile metadata is not the tensors: the bundle is reported, without init texts
        assert rc == 0 and "unet     1 modules" in out and "\x1b" not in out
        assert main(["inspect", "--json", str(path)]) == 0
        assert all(e["init_text"] == "" for e in json.loads(capsys.readouterr().out)["embeddings"])
        return
    assert rc == 2, out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pivotal: error: {path}"), err
    assert "\x1b" not in err and "Traceback" not in err


@pytest.mark.parametrize("case", sorted(set(CRASH_FILES) - READABLE))
def test_reader_raises_bundle_error(tmp_path: Path, case: str) -> None:
    path = CRASH_FILES[case](tmp_path)
    with pytest.raises(BundleError, match=str(path.name)):
        read_bundle(path)


def test_limits_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"header is not valid JSON \(nested too deeply\)"):
        read_header(CRASH_FILES["nested-header"](tmp_path))
    with pytest.raises(BundleError, match=r"an integer of 4301 digits \(limit 32\)"):
        read_header(CRASH_FILES["bigint-header"](tmp_path))
    with pytest.raises(BundleError, match=r"\[w\]: 65 dimensions, over the limit of 8"):
        read_header(CRASH_FILES["65-dims"](tmp_path))
    with pytest.raises(BundleError, match=r"\[w\]: unsupported dtype \[\]"):
        read_header(CRASH_FILES["dtype-list"](tmp_path))
    with pytest.raises(BundleError, match=r"key 'w' appears twice"):
        read_header(CRASH_FILES["duplicate-key"](tmp_path))
    # an embedding name no prompt can use is skipped (the LoRA still loads), named in the warning
    assert "embedding 'x\\n\\x1b[2J' skipped" in read_bundle(CRASH_FILES["control-chars-key"](tmp_path)).warnings[0]
    # the warning keeps the key as it is; printing it (inspect, above) escapes it
    with pytest.raises(BundleError, match=r"'lora_unet_\\ud800.alpha' holds a lone surrogate escape"):
        read_header(CRASH_FILES["lone-surrogate"](tmp_path))
    assert "x\n\x1b[2J" in read_bundle(CRASH_FILES["control-chars-unknown-key"](tmp_path)).warnings[-1]


def _broken_folder(folder: Path) -> Path:
    """A Lora folder: one good bundle, every crash file, a FIFO and a folder named like a file."""
    sub = folder / "broken"
    sub.mkdir(parents=True)
    for build in CRASH_FILES.values():
        build(sub)
    (folder / "dir.safetensors").mkdir()
    if hasattr(os, "mkfifo"):
        os.mkfifo(folder / "fifo.safetensors")  # opening it would block the scan forever
    (folder / "loop").symlink_to(folder)  # a link back up the tree
    good = folder / "good.safetensors"
    good.write_bytes(good_bundle_bytes({"pivotal.format": "1"}))
    return good


def test_folder_scans_skip_bad_files_and_go_on(tmp_path: Path) -> None:
    good = _broken_folder(tmp_path)
    taken, warnings = lora_folder_names(tmp_path)
    assert taken["good"] == f"the LoRA {good}" and "pvtchar" in taken
    assert any("nested.safetensors" in w for w in warnings) and any("fifo.safetensors" in w for w in warnings)
    entries, warnings = find_bundles(tmp_path)
    assert [e.names for e in entries if e.path == str(good)] == [["pvtchar"]]
    assert any("dims65.safetensors" in w for w in warnings)
    listed = {b["name"]: b for b in list_bundles(str(tmp_path))}
    assert listed["good"]["embeddings"] == ["pvtchar"]
    assert "65 dimensions" in listed["dims65"]["error"]


def test_generation_registers_good_bundle_beside_broken_files(tmp_path: Path, capsys: Any) -> None:
    from pivotal.webui.bundle_loader import BundleRegistrar
    from test_a1111_bundle_loader import _p, _webui

    _broken_folder(tmp_path)
    webui, reg = _webui(), BundleRegistrar()
    webui.embedding_db.expected_shape = 16
    p = _p("a photo of pvtchar")
    assert reg.register(webui, p, str(tmp_path), always=True) == ["pvtchar"]
    assert torch.equal(webui.embedding_db.word_embeddings["pvtchar"].vec,
                       next(iter(reg.index.scan(str(tmp_path))["pvtchar"].data["string_to_param"].values())))
    out = capsys.readouterr().out
    for name in ("nested.safetensors", "dims65.safetensors", "dtypelist.safetensors", "fifo.safetensors"):
        assert name in out
    reg.unregister(webui, p)
    assert webui.embedding_db.word_embeddings == {}
