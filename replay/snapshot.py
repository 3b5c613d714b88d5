"""Replay snapshots: the replay server's whole state as one checksummed ``.npz`` file.

A snapshot holds :meth:`TrialBuffer.state_dict` (entries ``buf_*``), the rate limiter's
counters, the server's sampling RNG, its insert de-duplication table and a few integers the
caller wants recorded with it (``extra_*``, e.g. the driver's counters).  It is a plain
``np.savez`` archive of numpy arrays only, read back with ``np.load(..., allow_pickle=False)``
(no pickle, no objects).  Entry ``sha256`` is the SHA-256 of every other entry (name, dtype,
shape and bytes, in name order), so a truncated, damaged or hand-edited file is refused with
a :class:`SnapshotError` that names the file instead of being half-loaded.

Files are written atomically (temp file in the same directory, fsync, rename, fsync of the
directory): a process killed while writing leaves the previous snapshot intact and at most
a stray ``*.tmp`` file that nothing reads.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

__all__ = ["SnapshotError", "pack_snapshot", "unpack_snapshot", "write_atomic",
           "write_snapshot_file", "read_snapshot_file", "SNAPSHOT_FORMAT"]

SNAPSHOT_FORMAT = 1
_MAX_ENTRIES = 256


class SnapshotError(ValueError):
    """A replay snapshot cannot be used (truncated, damaged, wrong format); names the file."""


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode() + b"\0" + a.dtype.str.encode() + b"\0"
                 + repr(tuple(a.shape)).encode() + b"\0")
        h.update(a.tobytes())
    return h.hexdigest()


def pack_snapshot(state: dict) -> bytes:
    """``{name: ndarray | int | float | str}`` -> ``.npz`` bytes with a ``sha256`` entry."""
    arrays = {}
    for name, value in state.items():
        a = np.asarray(value)
        if a.dtype == object:
            raise TypeError(f"snapshot entry {name!r} is not a plain array (dtype object)")
        arrays[name] = a
    arrays["snapshot_format"] = np.asarray(SNAPSHOT_FORMAT)
    arrays["sha256"] = np.asarray(_digest(arrays))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack_snapshot(data: bytes, where: str = "replay snapshot") -> dict[str, np.ndarray]:
    """Parse and verify :func:`pack_snapshot` bytes; ``where`` names the source in errors."""
    def fail(why: str) -> SnapshotError:
        return SnapshotError(f"replay snapshot {where!r} {why}; it may be truncated or damaged "
                             f"(delete it to resume with an empty replay buffer)")
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 22:
        raise fail("is empty or too short to be a snapshot")
    try:
        with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as z:
            if len(z.files) > _MAX_ENTRIES:
                raise ValueError(f"{len(z.files)} entries")
            arrays = {name: z[name] for name in z.files}
    except Exception as exc:  # noqa: BLE001 - zip/npy errors of every kind mean "unusable"
        reason = " ".join(str(exc).split())[:160]
        raise fail(f"cannot be read ({type(exc).__name__}: {reason})") from None
    stored = arrays.pop("sha256", None)
    if stored is None or stored.dtype.kind != "U" or stored.shape != ():
        raise fail("has no checksum entry (not a mpn-dqn replay snapshot)")
    if _digest(arrays) != str(stored):
        raise fail("fails its SHA-256 check")
    fmt = arrays.get("snapshot_format")
    if fmt is None or int(fmt) != SNAPSHOT_FORMAT:
        raise fail(f"has unsupported format {None if fmt is None else int(fmt)}")
    return arrays


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (temp + fsync + rename + dir fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_snapshot_file(path: str | os.PathLike, data: bytes) -> Path:
    """Write :func:`pack_snapshot` bytes atomically."""
    return write_atomic(path, data)


def read_snapshot_file(path: str | os.PathLike) -> tuple[bytes, dict[str, np.ndarray]]:
    """The file's bytes and its verified arrays; :class:`SnapshotError` names the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SnapshotError(f"replay snapshot {str(path)!r} cannot be read: {exc}") from None
    return data, unpack_snapshot(data, str(path))


def rng_to_array(rng: np.random.Generator) -> np.ndarray:
    """A PCG64 generator's state as 6 uint64 (so it fits an ``allow_pickle=False`` archive)."""
    s = rng.bit_generator.state
    if s.get("bit_generator") != "PCG64":
        raise TypeError(f"only PCG64 generators can be saved, got {s.get('bit_generator')}")
    m = (1 << 64) - 1
    return np.array([s["state"]["state"] >> 64, s["state"]["state"] & m, s["state"]["inc"] >> 64,
                     s["state"]["inc"] & m, s["has_uint32"], s["uinteger"]], dtype=np.uint64)


def rng_from_array(a: np.ndarray) -> np.random.Generator:
    r = [int(x) for x in np.asarray(a, dtype=np.uint64).reshape(6)]
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = {"bit_generator": "PCG64",
                               "state": {"state": (r[0] << 64) | r[1], "inc": (r[2] << 64) | r[3]},
                               "has_uint32": r[4], "uinteger": r[5]}
    return rng
