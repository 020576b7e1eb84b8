"""Reading hostile/broken safetensors files and writing atomically (checklist 27, 29, 35, 36, 37)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import stat
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pivotal.errors import BundleError, SaveError, UnsafeFileError
from pivotal.formats import safetensors_io as sio


def raw_file(path: Path, header: dict | bytes, data: bytes = b"", size_field: int | None = None) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if size_field is None else size_field
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


def test_valid_file_header_and_hash(tmp_path: Path) -> None:
    p = tmp_path / "ok.safetensors"
    save_file({"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.float16)}, str(p), {"k": "v"})
    h = sio.read_header(p)
    assert h.metadata == {"k": "v"}
    assert h.tensors["a"].shape == (2, 3) and h.tensors["b"].dtype == "F16"
    # the hash of the data section does not depend on metadata
    q = tmp_path / "other.safetensors"
    save_file({"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.float16)}, str(q), {"x": "y" * 99})
    assert sio.addnet_hash(p) == sio.addnet_hash(q) == sio.data_hash(load_file(str(p)))


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin", ".pth"])
def test_pickle_suffix_refused_with_conversion_hint(tmp_path: Path, suffix: str) -> None:
    p = tmp_path / f"emb{suffix}"
    torch.save({"string_to_param": {"*": torch.zeros(1, 4)}}, p)
    with pytest.raises(UnsafeFileError, match=rf"emb\{suffix}: '\{suffix}' files are pickle-based\. .*"
                                              r"pivotal convert FILE OUT\.safetensors"):
        sio.read_header(p)


@pytest.mark.parametrize("writer", ["torch_zip", "raw_pickle"])
def test_pickle_disguised_as_safetensors_refused(tmp_path: Path, writer: str) -> None:
    p = tmp_path / "sneaky.safetensors"
    if writer == "torch_zip":
        torch.save({"a": torch.zeros(1)}, p)
    else:
        p.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(UnsafeFileError, match="sneaky.safetensors: this is a pickle/zip torch file despite its name"):
        sio.read_header(p)


def test_header_size_with_low_byte_0x80_is_not_mistaken_for_pickle(tmp_path: Path) -> None:
    # the first byte of a safetensors file is the low byte of the header size; 0x80 is also
    # the pickle protocol marker
    p = tmp_path / "x.safetensors"
    for pad in range(300):
        save_file({"a": torch.ones(1)}, str(p), {"m": "x" * pad})
        if p.read_bytes()[0] == 0x80:
            break
    assert p.read_bytes()[0] == 0x80
    assert sio.read_header(p).metadata["m"] == "x" * pad


def test_header_over_cap_refused_before_parsing(tmp_path: Path) -> None:
    p = raw_file(tmp_path / "big.safetensors", b"{", size_field=sio.MAX_HEADER_BYTES + 1)
    with pytest.raises(BundleError, match=r"big.safetensors: header claims \d+ bytes, over the \d+-byte limit"):
        sio.read_header(p)


def test_truncated_files(tmp_path: Path) -> None:
    p = tmp_path / "t.safetensors"
    p.write_bytes(b"\x05\x00")
    with pytest.raises(BundleError, match="t.safetensors: file is 2 bytes, too short"):
        sio.read_header(p)
    good = tmp_path / "g.safetensors"
    save_file({"a": torch.ones(100)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(BundleError, match=r"cut.safetensors: tensors cover 400 data bytes but the file has 390"):
        sio.read_header(cut)
    cut2 = tmp_path / "cut2.safetensors"
    cut2.write_bytes(good.read_bytes()[:20])
    with pytest.raises(BundleError,
                       match=r"cut2.safetensors: header claims 64 bytes but the file has only 12 .*\(truncated"):
        sio.read_header(cut2)


def test_invalid_json_and_non_object(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="bad.safetensors: header is not valid JSON"):
        sio.read_header(raw_file(tmp_path / "bad.safetensors", b"{not json"))
    with pytest.raises(BundleError, match="arr.safetensors: header is not a JSON object"):
        sio.read_header(raw_file(tmp_path / "arr.safetensors", b"[1, 2]"))


def test_overlapping_and_gapped_offsets(tmp_path: Path) -> None:
    ent = {"dtype": "F32", "shape": [2]}
    over = {"a": {**ent, "data_offsets": [0, 8]}, "b": {**ent, "data_offsets": [4, 12]}}
    with pytest.raises(BundleError, match=r"o.safetensors \[b\]: data offsets are not contiguous: tensor overlaps"):
        sio.read_header(raw_file(tmp_path / "o.safetensors", over, b"\0" * 12))
    gap = {"a": {**ent, "data_offsets": [0, 8]}, "b": {**ent, "data_offsets": [12, 20]}}
    with pytest.raises(BundleError, match=r"g.safetensors \[b\]: data offsets are not contiguous: tensor leaves a gap"):
        sio.read_header(raw_file(tmp_path / "g.safetensors", gap, b"\0" * 20))
    wrong = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    with pytest.raises(BundleError, match=r"w.safetensors \[a\]: shape \[3\] of F32 needs 12 bytes"):
        sio.read_header(raw_file(tmp_path / "w.safetensors", wrong, b"\0" * 8))
    dt = {"a": {"dtype": "F8_E9", "shape": [1], "data_offsets": [0, 1]}}
    with pytest.raises(BundleError, match=r"d.safetensors \[a\]: unsupported dtype 'F8_E9'"):
        sio.read_header(raw_file(tmp_path / "d.safetensors", dt, b"\0"))


def test_metadata_must_be_strings(tmp_path: Path) -> None:
    h = {"__metadata__": {"k": {"nested": 1}}}
    with pytest.raises(BundleError, match=r"m.safetensors \[__metadata__\]: __metadata__ must map strings to strings"):
        sio.read_header(raw_file(tmp_path / "m.safetensors", h))


def test_huge_hostile_metadata_is_kept_as_opaque_strings(tmp_path: Path) -> None:
    p = tmp_path / "meta.safetensors"
    hostile = {"ss_tag_frequency": "{" * 100000, "x": "<script>alert(1)</script>", "big": "a" * 3_000_000}
    save_file({"a": torch.ones(1)}, str(p), hostile)
    h = sio.read_header(p)
    assert h.metadata == hostile  # read, never JSON-decoded
    with pytest.raises(BundleError, match="over the 1000-byte limit"):
        sio.read_header(p, max_header_bytes=1000)


def test_atomic_save_writes_and_verifies(tmp_path: Path) -> None:
    p = tmp_path / "out.safetensors"
    tensors = {"w": torch.randn(3, 4), "h": torch.randn(2, dtype=torch.float16)}
    header = sio.atomic_save(p, tensors, {"m": "1"})
    assert header.path == str(p) and header.metadata == {"m": "1"}
    back = load_file(str(p))
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert sio.stray_temp_files(tmp_path) == []


def test_failed_save_keeps_previous_file_and_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "keep.safetensors"
    sio.atomic_save(p, {"w": torch.ones(2)})
    before = p.read_bytes()

    def disk_full(path: Path) -> None:  # fault injection: the disk fills up at fsync
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sio, "_fsync_file", disk_full)
    with pytest.raises(SaveError, match=r"cannot save .*keep.safetensors: No space left on device "
                                        r"\(the previous file, if any, is unchanged\)"):
        sio.atomic_save(p, {"w": torch.zeros(2)})
    assert p.read_bytes() == before
    assert sio.stray_temp_files(tmp_path) == []


def test_save_into_missing_folder_or_onto_folder(tmp_path: Path) -> None:
    with pytest.raises(SaveError, match="folder .*nope does not exist"):
        sio.atomic_save(tmp_path / "nope" / "x.safetensors", {"w": torch.ones(1)})
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(SaveError, match="a folder has that name"):
        sio.atomic_save(tmp_path / "d.safetensors", {"w": torch.ones(1)})


def test_stray_temp_files_detected(tmp_path: Path) -> None:
    # what a save killed between writing and renaming leaves behind
    stray = tmp_path / f".x.safetensors{sio.TEMP_MARK}123-abcd"
    stray.write_bytes(b"partial")
    (tmp_path / "x.safetensors").write_bytes(b"")
    assert sio.stray_temp_files(tmp_path) == [stray]


def test_load_tensors_wraps_safetensors_errors(tmp_path: Path) -> None:
    p = tmp_path / "ok.safetensors"
    save_file({"a": torch.ones(2)}, str(p))
    h = sio.read_header(p)
    p.write_bytes(b"garbage")  # the file changed after its header was read
    with pytest.raises(BundleError, match="ok.safetensors: changed on disk since its header was read"):
        sio.load_tensors(h)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    # safetensors' save_file writes 0600: a webui running as another user could not read the bundle
    old = os.umask(umask)
    try:
        sio.atomic_save(tmp_path / "m.safetensors", {"w": torch.ones(2)})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o666 & ~umask


def test_a_file_replaced_after_its_header_was_read_is_refused_or_reread(tmp_path: Path) -> None:
    p = tmp_path / "r.safetensors"
    sio.atomic_save(p, {"w": torch.ones(2)})
    header = sio.read_header(p)
    sio.atomic_save(p, {"w": torch.full((2,), 7.0)})  # replaced (a new inode) before the tensors are read
    with pytest.raises(BundleError, match="r.safetensors: changed on disk since its header was read"):
        sio.load_tensors(header)
    with open(p, "r+b") as f:  # rewritten in place: same inode, new mtime
        f.seek(-4, os.SEEK_END)
        f.write(struct.pack("<f", 9.0))
    os.utime(p, ns=(header.stamp[3] + 10**9, header.stamp[3] + 10**9))
    header2 = sio.read_header(p)
    assert sio.load_tensors(header2)["w"].tolist() == [7.0, 9.0]
    assert sio.read_file(p)[1]["w"].tolist() == [7.0, 9.0]


def test_read_file_rereads_a_file_that_changed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "x.safetensors"
    sio.atomic_save(p, {"w": torch.ones(2)})
    real = sio.read_header
    calls = []

    def header_then_replace(path: object, *a: object) -> sio.Header:
        h = real(path, *a)
        calls.append(h)
        if len(calls) == 1:  # a writer replaces the file right after the first header read
            sio.atomic_save(p, {"w": torch.zeros(3)})
        return h

    monkeypatch.setattr(sio, "read_header", header_then_replace)
    header, tensors = sio.read_file(p)
    assert len(calls) == 3 and header.tensors["w"].shape == (3,) and tensors["w"].tolist() == [0.0] * 3
