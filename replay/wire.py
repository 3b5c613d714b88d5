"""Sampled batches between the replay server and the learner: arrays, checked on arrival.

The replay server hands a :class:`~replay.buffer.TrialBatch` of numpy arrays to its caller as
it is.  In one process that is a reference; on Ray the arrays travel through the object
store (pickle protocol 5, out of band), so neither side encodes or decodes them, and a learner
on the replay's node reads them from shared memory without a copy.  The batch crosses no
trust boundary (both ends run inside the cluster), so :func:`check_batch` only guards
against a mismatched peer: it checks every array's type, dtype and that the shapes agree
(B, T, N, O, S) without copying anything, and raises
:class:`~common.codec.TrialDecodeError` otherwise.
"""
from __future__ import annotations

import numpy as np

from mpn_dqn.common.codec import TrialDecodeError
from mpn_dqn.replay.buffer import TrialBatch

# name -> (dtype, symbolic shape); burnin_state is [B, S] or [B, 0] (no burn-in in the batch)
FIELDS = {
    "obs": (np.float32, ("B", "T", "O")),
    "actions": (np.int64, ("B", "T")),
    "rewards": (np.float32, ("B", "T")),
    "mask": (np.bool_, ("B", "T")),
    "lengths": (np.int64, ("B",)),
    "init_state": (np.float32, ("B", "S")),
    "burnin_obs": (np.float32, ("B", "N", "O")),
    "burnin_mask": (np.bool_, ("B", "N")),
    "burnin_state": (np.float32, ("B", "S?")),
}


def check_batch(batch, obs_dim: int, state_size: int) -> TrialBatch:
    """``batch`` if it is a TrialBatch whose arrays fit ``obs_dim`` and ``state_size``."""
    if not isinstance(batch, TrialBatch):
        raise TrialDecodeError(f"batch: expected a TrialBatch, got {type(batch).__name__}")
    dims: dict[str, int] = {"O": obs_dim, "S": state_size}
    for name, (dtype, sym) in FIELDS.items():
        a = getattr(batch, name)
        if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != len(sym):
            got = f"{a.dtype}{list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
            raise TrialDecodeError(f"batch.{name}: expected {np.dtype(dtype)} with dimensions "
                                   f"{sym}, got {got}")
        for d, s in zip(a.shape, sym):
            if s == "S?":
                if d not in (0, state_size):
                    raise TrialDecodeError(f"batch.{name}: state dimension {d}, expected 0 or "
                                           f"{state_size}")
            elif dims.setdefault(s, d) != d:
                raise TrialDecodeError(f"batch.{name}: dimension {s} is {d} here but {dims[s]} "
                                       "elsewhere")
    if batch.burnin_obs.shape[1] and batch.burnin_state.shape[1] != state_size:
        raise TrialDecodeError("batch.burnin_state: missing although the batch has burn-in steps")
    return batch


# -- batches through shared memory (replay server and learner on one node) --------------------
_ALIGN = 64


def batch_layout(B: int, T: int, N: int, O: int, S: int) -> tuple[list, int]:
    """Where each array of a (B, T, N) batch lies in a shared-memory slot: a list of
    (name, dtype, shape, byte offset), and the bytes the slot needs.  ``burnin_state`` is
    [B, S] when N > 0, else [B, 0]."""
    out, off = [], 0
    for name, (dtype, sym) in FIELDS.items():
        dims = {"B": B, "T": T, "N": N, "O": O, "S": S, "S?": S if N else 0}
        shape = tuple(dims[s] for s in sym)
        out.append((name, np.dtype(dtype), shape, off))
        off += -(-int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize // _ALIGN) * _ALIGN
    return out, off


def batch_views(buf, offset: int, B: int, T: int, N: int, O: int, S: int) -> dict:
    """numpy views of a batch's arrays in ``buf`` (a buffer) from ``offset`` on."""
    layout, _ = batch_layout(B, T, N, O, S)
    return {name: np.ndarray(shape, dtype, buffer=buf, offset=offset + off)
            for name, dtype, shape, off in layout}


class SharedSlots:
    """Batch slots in one shared-memory segment that the learner's side owns: the replay
    server (on the same node) samples straight into slots, several per request, and the
    learner reads the arrays where they lie.  ``slots`` must cover the batches the learner holds
    at once (queued + training) plus one request's; the segment grows (a new one) when a batch
    does not fit."""

    def __init__(self, slots: int, slot_bytes: int):
        from multiprocessing import shared_memory
        self.slots, self.slot_bytes = int(slots), int(slot_bytes)
        self.shm = shared_memory.SharedMemory(create=True, size=self.slots * self.slot_bytes)
        self.next = 0
        self.opened = False             # the replay server has mapped it (its name is dropped)

    @property
    def name(self) -> str:
        return self.shm.name

    def peek(self, n: int) -> list[int]:
        """Byte offsets of the next ``n`` slots (round robin); :meth:`advance` by those used, so
        the batches handed out always lie in consecutive slots."""
        return [((self.next + i) % self.slots) * self.slot_bytes for i in range(n)]

    def advance(self, n: int) -> None:
        self.next = (self.next + n) % self.slots

    def unlink(self) -> None:
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.unlink()
        try:
            self.shm.close()
        except BufferError:             # views of it still in use: unmapped when they go
            pass


class AttachedSegments:
    """The replay server's side: segments attached by name, kept open (a few per learner)."""

    def __init__(self, keep: int = 8):
        self.keep = keep
        self.open: dict[str, object] = {}

    def get(self, name: str):
        shm = self.open.get(name)
        if shm is None:
            from multiprocessing import resource_tracker, shared_memory
            shm = shared_memory.SharedMemory(name=name)
            # the learner's side owns and unlinks it; this process must not unlink it at exit
            resource_tracker.unregister(shm._name, "shared_memory")
            while len(self.open) >= self.keep:
                self.open.pop(next(iter(self.open))).close()
            self.open[name] = shm
        return shm.buf
