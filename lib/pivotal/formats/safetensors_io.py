"""Safe reading and atomic writing of safetensors files.

Reading parses the header ourselves first, with a size cap *before* any JSON parsing, and checks
its structure (dtypes, shapes, contiguous offsets that cover the file exactly), so a hostile or
truncated file is refused with a message that names it, before a tensor is touched. Pickle-based
files are refused outright: unpickling can run code.

Writing goes to a temp file in the target's folder, is fsynced, re-opened and verified, and only
then renamed over the target, so the previous file survives any failure.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import torch

from pivotal.errors import BundleError, SaveError, UnsafeFileError
from pivotal.formats.json_limits import loads_limited

#: Largest header we parse. safetensors itself allows 100 MB; real LoRA headers are KBs, and the
#: biggest metadata seen in the wild (cover images, tag frequencies) is a few MB.
MAX_HEADER_BYTES = 32 * 1024 * 1024
#: Most dimensions a tensor may have (torch refuses more than 64; weights have at most 5).
MAX_DIMS = 8
#: Largest single dimension (a dimension of 0 makes any other size fit in 0 bytes; torch sizes are int64).
MAX_DIM_SIZE = 2**40
#: Most tensors in one file (an SDXL checkpoint has ~2,500; the largest LyCORIS files ~10,000).
MAX_TENSORS = 100_000

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")

#: safetensors dtype name → (torch dtype, bytes per element).
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

TEMP_MARK = ".pivotal-tmp-"

CONVERT_HINT = ("Pivotal reads safetensors only, because loading a pickle file can run arbitrary code. "
                "If you trust the file, convert it once with: pivotal convert FILE OUT.safetensors")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # offsets into the data section (after the 8 + header_size bytes)
    end: int


@dataclass(frozen=True)
class Header:
    """A validated safetensors header. ``metadata`` values are strings, never parsed here.

    ``stamp``: (device, inode, size, mtime_ns) of the file the header was read from; tensors are
    only loaded from a file with the same stamp (see :func:`load_tensors`).
    """

    path: str
    header_size: int
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    stamp: tuple[int, int, int, int] | None = None


def refuse_pickle(path: Path) -> None:
    """Raise UnsafeFileError if ``path`` is a pickle/zip torch file (by name or by content)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFileError(path, f"'{path.suffix}' files are pickle-based. {CONVERT_HINT}")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise BundleError(path, f"cannot read file: {e.strerror or e}") from e
    if head[8:9] == b"{":
        # safetensors: 8 size bytes, then the JSON header. The first size byte can be 0x80, so
        # this must be decided before the pickle test below.
        return
    # torch.save writes a zip ("PK\x03\x04"); older torch a raw pickle (protocol byte 0x80).
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        raise UnsafeFileError(path, f"this is a pickle/zip torch file despite its name. {CONVERT_HINT}")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_header(path: str | os.PathLike, max_header_bytes: int = MAX_HEADER_BYTES) -> Header:
    """Read and validate the header of ``path`` without reading any tensor data.

    Every problem is a BundleError naming the file (and the tensor, where one is at fault).
    """
    p = Path(path)
    refuse_pickle(p)
    try:
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(p, "is not a regular file")
            file_size = st.st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise BundleError(p, f"file is {file_size} bytes, too short to be safetensors "
                                     "(truncated or not a safetensors file)")
            (n,) = struct.unpack("<Q", prefix)
            if n > max_header_bytes:
                raise BundleError(p, f"header claims {n} bytes, over the {max_header_bytes}-byte limit "
                                     "(corrupt, or not a safetensors file)")
            if 8 + n > file_size:
                raise BundleError(p, f"header claims {n} bytes but the file has only {file_size - 8} "
                                     "after the size field (truncated download or write?)")
            raw = f.read(n)
    except OSError as e:
        raise BundleError(p, f"cannot read file: {e.strerror or e}") from e
    if len(raw) != n:
        raise BundleError(p, "file shrank while its header was read (being written?)")
    if not raw.lstrip(b" ").startswith(b"{"):
        raise BundleError(p, "header is not a JSON object (not a safetensors file)")
    try:
        doc = loads_limited(raw)
    except ValueError as e:
        raise BundleError(p, f"header is not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise BundleError(p, "header is not a JSON object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise BundleError(p, "__metadata__ must map strings to strings", key="__metadata__")
    for text in (*doc, *metadata, *metadata.values()):
        if not _encodable(text):
            # JSON can spell a lone surrogate (\ud800); safetensors and every webui refuse the file
            raise BundleError(p, f"{text[:80]!r} holds a lone surrogate escape; not a valid safetensors header")
    if len(doc) > MAX_TENSORS:
        raise BundleError(p, f"{len(doc)} tensors, over the limit of {MAX_TENSORS}")
    tensors = _validate_entries(p, doc, data_size=file_size - 8 - n)
    return Header(str(p), n, file_size, tensors, metadata, _stamp(st))


def _entry(p: Path, name: str, e: object) -> TensorInfo:
    """One tensor entry, type-checked before anything is computed from it."""
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        raise BundleError(p, "malformed tensor entry (needs exactly dtype, shape, data_offsets)", key=name)
    dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise BundleError(p, f"unsupported dtype {_short_repr(dtype)}", key=name)
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d <= MAX_DIM_SIZE for d in shape)):
        raise BundleError(p, f"bad shape {_short_repr(shape)} (needs a list of sizes 0..{MAX_DIM_SIZE})", key=name)
    if len(shape) > MAX_DIMS:
        raise BundleError(p, f"{len(shape)} dimensions, over the limit of {MAX_DIMS}", key=name)
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
            and 0 <= offs[0] <= offs[1]):
        raise BundleError(p, f"bad data offsets {_short_repr(offs)}", key=name)
    numel = 1
    for d in shape:
        numel *= d
    if numel * DTYPES[dtype][1] != offs[1] - offs[0]:
        raise BundleError(p, f"shape {shape} of {dtype} needs {numel * DTYPES[dtype][1]} bytes "
                             f"but its offsets span {offs[1] - offs[0]}", key=name)
    return TensorInfo(dtype, tuple(shape), offs[0], offs[1])


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _validate_entries(p: Path, doc: dict, data_size: int) -> dict[str, TensorInfo]:
    """Check every tensor entry and that the entries tile the data section with no gap/overlap."""
    infos = {name: _entry(p, name, e) for name, e in doc.items()}
    pos = 0
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start != pos:
            what = "overlaps the previous tensor" if info.start < pos else "leaves a gap before it"
            raise BundleError(p, f"data offsets are not contiguous: tensor {what}", key=name)
        pos = info.end
    if pos != data_size:
        raise BundleError(p, f"tensors cover {pos} data bytes but the file has {data_size} "
                             "(truncated, or trailing bytes)")
    return infos


def load_tensors(header: Header, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Load tensors (all, or ``keys``) of a file whose header was validated, on CPU.

    The bytes come from the file the header was read from: a file replaced or rewritten since
    (another stamp) is refused, as is one that changes while its tensors are read, so what is
    loaded is always what was checked. Each tensor owns its memory (no view of a mapped file).
    """
    wanted = list(header.tensors) if keys is None else list(keys)
    changed = "changed on disk since its header was read (being rewritten?); read it again"
    out: dict[str, torch.Tensor] = {}
    try:
        with open(header.path, "rb") as f:
            if header.stamp is not None and _stamp(os.fstat(f.fileno())) != header.stamp:
                raise BundleError(header.path, changed)
            base = 8 + header.header_size
            for k in wanted:
                info = header.tensors.get(k)
                if info is None:
                    raise BundleError(header.path, "no such tensor", key=k)
                out[k] = _read_tensor(f, header.path, k, info, base)
            if header.stamp is not None and _stamp(os.fstat(f.fileno())) != header.stamp:
                raise BundleError(header.path, changed)
    except OSError as e:
        raise BundleError(header.path, f"cannot read file: {e.strerror or e}") from e
    return out


def _read_tensor(f: BinaryIO, path: str, key: str, info: TensorInfo, base: int) -> torch.Tensor:
    """One tensor's bytes as a tensor (little-endian, as safetensors stores them)."""
    dtype = DTYPES[info.dtype][0]
    size = info.end - info.start
    if size == 0:
        return torch.empty(info.shape, dtype=dtype)
    f.seek(base + info.start)
    buf = bytearray(size)
    if f.readinto(buf) != size:  # type: ignore[attr-defined]  # real files are buffered readers
        raise BundleError(path, "file ended inside this tensor (truncated while being read?)", key=key)
    if sys.byteorder != "little" and DTYPES[info.dtype][1] > 1:
        raise BundleError(path, "safetensors data is little-endian; this machine is not", key=key)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


def read_file(path: str | os.PathLike, keys: Iterable[str] | None = None
              ) -> tuple[Header, dict[str, torch.Tensor]]:
    """(validated header, tensors) of ``path``; read once more when the file changed in between."""
    for attempt in (1, 2):
        header = read_header(path)
        try:
            return header, load_tensors(header, keys)
        except BundleError as e:
            if attempt == 2 or "changed on disk" not in e.problem:
                raise
    raise AssertionError("unreachable")


def addnet_hash(path: str | os.PathLike, header_size: int | None = None) -> str:
    """sha256 of the bytes after the 8 + N byte header: the hash the webui shows for LoRAs."""
    p = Path(path)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        if header_size is None:
            (header_size,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + header_size)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_hash(tensors: dict[str, torch.Tensor]) -> str:
    """The :func:`addnet_hash` that a file holding ``tensors`` will have, whatever its metadata.

    The data section's layout depends only on the tensors, never on ``__metadata__``, so the hash
    can be computed before the metadata that records it is written.
    """
    from safetensors.torch import save

    blob = save(tensors)
    (n,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform (Windows); the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; nothing to recover
    finally:
        os.close(fd)


def atomic_save(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                metadata: dict[str, str] | None = None) -> Header:
    """Write ``tensors`` to ``path`` atomically and return the verified header of the result.

    Steps: temp file next to the target → fsync → re-open and verify every key, dtype, shape and
    value → rename over the target → fsync the folder. On any failure the temp file is removed,
    the previous ``path`` is untouched, and SaveError names the path.
    """
    from safetensors.torch import save

    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise SaveError(f"cannot save {target}: folder {folder} does not exist")
    if target.is_dir():
        raise SaveError(f"cannot save {target}: a folder has that name")
    tmp = folder / f".{target.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        blob = save({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, metadata)
        _write_new_file(tmp, blob)
        del blob
        header = read_header(tmp)
        _verify(tmp, header, tensors, metadata or {})
        os.replace(tmp, target)
        _fsync_dir(folder)
    except BaseException as e:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise SaveError(f"cannot save {target}: {e.strerror or e} (the previous file, if any, "
                            "is unchanged)") from e
        if isinstance(e, BundleError):
            raise SaveError(f"cannot save {target}: verification of the written file failed: "
                            f"{e.problem}") from e
        raise
    st = target.stat()
    return Header(str(target), header.header_size, header.file_size, header.tensors, header.metadata,
                  _stamp(st))


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (never an existing file or link) with the user's umask, write, fsync.

    safetensors' own ``save_file`` creates files with mode 0600, which a webui running as another
    user (or a file server) cannot read; ``open(..., 0o666)`` lets the umask decide, as every other
    program's files.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 1 << 26]):]
    finally:
        os.close(fd)
    _fsync_file(path)


def _verify(tmp: Path, header: Header, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    if set(header.tensors) != set(tensors) or header.metadata != metadata:
        raise BundleError(tmp, "written keys or metadata differ from what was asked")
    back = load_tensors(header)
    for k, t in tensors.items():
        if not torch.equal(back[k], t.detach().cpu()):
            raise BundleError(tmp, "written tensor differs from memory", key=k)


def stray_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Temp files left by a save that was killed mid-way (safe to delete; never a final file)."""
    d = Path(folder)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name.startswith(".") and TEMP_MARK in p.name)
