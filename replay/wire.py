"""msgpack encoding of sampled batches (replay server -> learner), validated on decode.

Message: ``{"schema": "mpn-dqn/batch", "v": 2, "arrays": {name: {dtype, shape, data}}}`` with
exactly the :class:`~replay.buffer.TrialBatch` arrays that the learner reads (the trials'
outcome, weights version and slots stay on the replay server).  Decoding checks every dtype and
that all shapes agree (B, T, N, O, S) before building arrays; any defect raises
:class:`~common.codec.TrialDecodeError`.
"""
from __future__ import annotations

import numpy as np
import msgpack

from mpn_dqn.common.codec import TrialDecodeError, _decode_array, _unpack
from mpn_dqn.replay.buffer import TrialBatch

BATCH_SCHEMA = "mpn-dqn/batch"
BATCH_VERSION = 2
_F4, _I8, _B1 = np.dtype("<f4"), np.dtype("<i8"), np.dtype("|b1")
# name -> (wire dtype, native type, symbolic shape)
_FIELDS = {
    "obs": (_F4, np.float32, ("B", "T", "O")),
    "actions": (_I8, np.int64, ("B", "T")),
    "rewards": (_F4, np.float32, ("B", "T")),
    "mask": (_B1, np.bool_, ("B", "T")),
    "lengths": (_I8, np.int64, ("B",)),
    "init_state": (_F4, np.float32, ("B", "S")),
    "burnin_obs": (_F4, np.float32, ("B", "N", "O")),
    "burnin_mask": (_B1, np.bool_, ("B", "N")),
    "burnin_state": (_F4, np.float32, ("B", "S")),
}


def encode_batch(batch: TrialBatch) -> bytes:
    arrays = {}
    for name, (wire, _, _) in _FIELDS.items():
        a = np.ascontiguousarray(getattr(batch, name), dtype=wire)
        arrays[name] = {"dtype": wire.str, "shape": list(a.shape), "data": a.tobytes()}
    return msgpack.packb({"schema": BATCH_SCHEMA, "v": BATCH_VERSION, "arrays": arrays}, use_bin_type=True)


def decode_batch(payload: bytes, obs_dim: int, state_size: int, max_bytes: int = 1 << 30) -> TrialBatch:
    obj = _unpack(payload, max_bytes, "batch", 1 << 20, TrialDecodeError)
    if not isinstance(obj, dict) or obj.get("schema") != BATCH_SCHEMA or obj.get("v") != BATCH_VERSION:
        raise TrialDecodeError(f"batch: not a {BATCH_SCHEMA} v{BATCH_VERSION} message")
    arrays = obj.get("arrays")
    if not isinstance(arrays, dict) or set(arrays) != set(_FIELDS):
        raise TrialDecodeError(f"batch.arrays: expected exactly the fields {sorted(_FIELDS)}")
    dims: dict[str, int] = {"O": obs_dim, "S": state_size}
    out = {}
    for name, (wire, native, sym) in _FIELDS.items():
        def shape_ok(shape, sym=sym):
            if len(shape) != len(sym):
                return f"expected {len(sym)} dimensions {sym}, got {shape}"
            for d, s in zip(shape, sym):
                if dims.setdefault(s, d) != d:
                    return f"dimension {s} is {d} here but {dims[s]} elsewhere"
            return None
        out[name] = _decode_array(arrays[name], f"batch.{name}", wire, native, shape_ok, TrialDecodeError)
    m = out["mask"]
    if out["lengths"].size and (out["lengths"] != m.sum(1)).any():
        raise TrialDecodeError("batch.lengths: do not match the mask")
    if out["actions"].size and (out["actions"].min() < 0):
        raise TrialDecodeError("batch.actions: negative action")
    return TrialBatch(**out)
