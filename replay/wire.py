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
