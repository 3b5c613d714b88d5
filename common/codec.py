"""msgpack wire format for trial batches and weight broadcasts (no pickle anywhere).

Trial batch message (a msgpack map)::

    {"schema": "mpn-dqn/trials", "v": 1, "trials": [trial, ...]}

each ``trial`` a map with exactly the :class:`~common.trial.Trial` field names as keys.  Array
fields are maps ``{"dtype": str, "shape": [int, ...], "data": bin}`` with the raw bytes in C
order, little-endian; the dtype of each field is fixed (``"<f4"`` for obs, rewards,
init_state, burnin_obs, burnin_state; ``"<i8"`` for actions and gt; ``"|b1"`` for trial_end)
and anything else is rejected.  Scalar fields are msgpack ints (``correct`` a msgpack bool).

Weight broadcast message::

    {"schema": "mpn-dqn/params", "v": 1, "version": int, "params": {name: float32 array map}}

Decoding is strict: the payload size is checked before anything is parsed, msgpack runs with
length limits so no declared size can cause a large allocation, every declared array size is
checked against its data before an array is made, and every field's type, shape, range and
finiteness is checked.  Any defect raises :class:`TrialDecodeError` (for weights its subclass
:class:`ParamsDecodeError`) with a message naming the field; no other exception escapes.
Decoded arrays are fresh, writable, native-endian copies owned by the caller.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import msgpack
import numpy as np

from common.trial import Trial

__all__ = ["TrialDecodeError", "ParamsDecodeError", "TrialSchema", "encode_trials",
           "decode_trials", "encode_params", "decode_params", "TRIALS_SCHEMA", "PARAMS_SCHEMA",
           "FORMAT_VERSION"]

TRIALS_SCHEMA = "mpn-dqn/trials"
PARAMS_SCHEMA = "mpn-dqn/params"
FORMAT_VERSION = 1

_INT64_MIN = -(2 ** 63)
_INT64_MAX = 2 ** 63 - 1

_F4 = np.dtype("<f4")
_I8 = np.dtype("<i8")
_B1 = np.dtype("|b1")

# wire dtype and native dtype of each array field (the wire dtype is the only one accepted)
_ARRAY_FIELDS: dict[str, tuple[np.dtype, type]] = {
    "obs": (_F4, np.float32),
    "actions": (_I8, np.int64),
    "rewards": (_F4, np.float32),
    "gt": (_I8, np.int64),
    "trial_end": (_B1, np.bool_),
    "init_state": (_F4, np.float32),
    "burnin_obs": (_F4, np.float32),
    "burnin_state": (_F4, np.float32),
}
_INT_FIELDS = ("ground_truth", "fix_breaks", "episode_id", "actor_id", "env_id", "trial_index",
               "weights_version")
_BOOL_FIELDS = ("correct",)
_TRIAL_KEYS = frozenset(_ARRAY_FIELDS) | frozenset(_INT_FIELDS) | frozenset(_BOOL_FIELDS)
_ARRAY_KEYS = frozenset({"dtype", "shape", "data"})
_TRIALS_TOP_KEYS = frozenset({"schema", "v", "trials"})
_PARAMS_TOP_KEYS = frozenset({"schema", "v", "version", "params"})

_MAX_STR = 1024          # longest string anywhere in a message (keys, dtype, names)
_MAX_PARAM_NDIM = 8


class TrialDecodeError(ValueError):
    """A received message is not a valid trial batch (or weight broadcast); the message says
    which field is wrong and how."""


class ParamsDecodeError(TrialDecodeError):
    """A received weight broadcast is invalid (a :class:`TrialDecodeError`, so one ``except``
    covers both message kinds)."""


@dataclass(frozen=True)
class TrialSchema:
    """What the receiver expects of every trial, and the limits that bound decoding work."""

    obs_dim: int
    state_size: int
    num_actions: int
    max_trial_len: int = 100_000
    max_burnin: int = 10_000
    max_trials: int = 100_000
    max_message_bytes: int = 256 * 2 ** 20

    def __post_init__(self) -> None:
        for name in ("obs_dim", "state_size", "num_actions", "max_trial_len", "max_trials",
                     "max_message_bytes"):
            v = getattr(self, name)
            if type(v) is not int or v < 1:
                raise ValueError(f"TrialSchema.{name} must be a positive int, got {v!r}")
        if type(self.max_burnin) is not int or self.max_burnin < 0:
            raise ValueError(f"TrialSchema.max_burnin must be an int >= 0, got "
                             f"{self.max_burnin!r}")


# --------------------------------------------------------------------------------- encoding

def _pack_array(a: Any, wire: np.dtype) -> dict:
    if type(a) is np.ndarray and a.dtype == wire and a.flags.c_contiguous:
        arr = a                                  # the actor's arrays: already the wire layout
    else:
        arr = np.asarray(a, dtype=wire, order="C")   # (ascontiguousarray would make 0-d 1-d)
    # msgpack writes the shape tuple as an array, exactly as a list
    return {"dtype": _WIRE_STR[wire], "shape": arr.shape, "data": arr.tobytes()}


_WIRE_STR = {_F4: _F4.str, _I8: _I8.str, _B1: _B1.str}
_ARRAY_ITEMS = tuple(_ARRAY_FIELDS.items())


def _trial_to_obj(t: Trial) -> dict:
    obj: dict[str, Any] = {name: _pack_array(getattr(t, name), wire)
                           for name, (wire, _native) in _ARRAY_ITEMS}
    for name in _INT_FIELDS:
        obj[name] = int(getattr(t, name))
    obj["correct"] = bool(t.correct)
    return obj


def encode_trials(trials: Iterable[Trial]) -> bytes:
    """Serialise trials to one message.  Arrays are converted to their wire dtype (float32,
    int64, bool) and written with one ``tobytes()`` each; nothing is validated here beyond what
    the conversion needs (the receiver validates)."""
    msg = {"schema": TRIALS_SCHEMA, "v": FORMAT_VERSION,
           "trials": [_trial_to_obj(t) for t in trials]}
    return msgpack.packb(msg, use_bin_type=True)


def encode_params(params: dict[str, np.ndarray], version: int) -> bytes:
    """Serialise a weight broadcast: ``{name: array}`` (sent as float32) and its version."""
    if type(version) is not int and not isinstance(version, np.integer):
        raise TypeError(f"version must be an int, got {type(version).__name__}")
    version = int(version)
    if not 0 <= version <= _INT64_MAX:
        raise ValueError(f"version must be in [0, 2**63), got {version}")
    out = {}
    for name, value in params.items():
        if not isinstance(name, str) or not name or len(name.encode()) > _MAX_STR:
            raise ValueError(f"parameter names must be non-empty str of at most {_MAX_STR} "
                             f"bytes, got {name!r}")
        out[name] = _pack_array(value, _F4)
    msg = {"schema": PARAMS_SCHEMA, "v": FORMAT_VERSION, "version": version, "params": out}
    return msgpack.packb(msg, use_bin_type=True)


# --------------------------------------------------------------------------------- decoding

def _short(x: Any, n: int = 60) -> str:
    r = repr(x)
    return r if len(r) <= n else r[: n - 3] + "..."


def _tname(x: Any) -> str:
    return type(x).__name__


def _pairs_to_dict(pairs: list) -> dict:
    """object_pairs_hook: reject non-str and duplicate keys instead of silently overwriting."""
    d = {}
    for k, v in pairs:
        if not isinstance(k, str):
            raise TrialDecodeError(f"map key {_short(k)} is not a string")
        if k in d:
            raise TrialDecodeError(f"duplicate map key {_short(k)}")
        d[k] = v
    return d


def _unpack(payload: Any, max_bytes: int, what: str, max_array_len: int,
            err: type[TrialDecodeError]) -> Any:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise err(f"payload: expected bytes, got {_tname(payload)}")
    size = memoryview(payload).nbytes
    if size > max_bytes:
        raise err(f"payload: {size} bytes exceeds the limit of {max_bytes} bytes")
    if size == 0:
        raise err("payload: empty message")
    try:
        return msgpack.unpackb(
            payload, raw=False, strict_map_key=True, use_list=True,
            object_pairs_hook=_pairs_to_dict,
            max_bin_len=size, max_str_len=min(size, _MAX_STR),
            max_array_len=min(size, max_array_len), max_map_len=min(size, 64 if what == "trials"
                                                                     else size),
            max_ext_len=0)
    except TrialDecodeError as e:
        raise err(f"payload: {e}") from None
    except Exception as e:  # msgpack's own errors, limits, StackError, MemoryError, ...
        raise err(f"payload: not a valid msgpack {what} message "
                  f"({_tname(e)}: {_short(str(e), 120)})") from None


def _check_keys(obj: dict, expected: frozenset, path: str, err: type[TrialDecodeError]) -> None:
    keys = set(obj)
    if keys != expected:
        missing = sorted(expected - keys)
        unknown = sorted(str(k)[:40] for k in keys - expected)
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unknown:
            parts.append(f"unknown keys {unknown}")
        raise err(f"{path}: " + "; ".join(parts))


def _check_header(obj: Any, schema: str, keys: frozenset, err: type[TrialDecodeError]) -> None:
    if not isinstance(obj, dict):
        raise err(f"message: top level must be a map, got {_tname(obj)}")
    got = obj.get("schema")
    if not isinstance(got, str) or got != schema:
        raise err(f"message.schema: expected {schema!r}, got {_short(got)}")
    _check_keys(obj, keys, "message", err)
    v = obj["v"]
    if type(v) is not int or v != FORMAT_VERSION:
        raise err(f"message.v: unsupported format version {_short(v)} "
                  f"(this decoder reads version {FORMAT_VERSION})")


def _decode_array(obj: Any, path: str, wire: np.dtype, native: type,
                  shape_ok, err: type[TrialDecodeError]) -> np.ndarray:
    """Validate an array map and build a fresh native-endian array.  ``shape_ok(shape)``
    returns None if the declared shape is acceptable, else a description of the problem; it
    is called before any array is created."""
    if not isinstance(obj, dict):
        raise err(f"{path}: expected an array map {{dtype, shape, data}}, got {_tname(obj)}")
    _check_keys(obj, _ARRAY_KEYS, path, err)
    dt = obj["dtype"]
    if not isinstance(dt, str) or dt != wire.str:
        raise err(f"{path}: dtype must be {wire.str!r}, got {_short(dt)}")
    shape = obj["shape"]
    if not isinstance(shape, list):
        raise err(f"{path}: shape must be a list of ints, got {_tname(shape)}")
    for d in shape:
        if type(d) is not int or d < 0 or d > _INT64_MAX:
            raise err(f"{path}: shape {_short(shape)} has an invalid dimension {_short(d)}")
    problem = shape_ok(shape)
    if problem:
        raise err(f"{path}: {problem}")
    data = obj["data"]
    if not isinstance(data, bytes):
        raise err(f"{path}: data must be binary, got {_tname(data)}")
    need = math.prod(shape) * wire.itemsize
    if need != len(data):
        raise err(f"{path}: shape {shape} needs {need} bytes of data, got {len(data)}")
    if wire.kind == "b" and len(data) and np.frombuffer(data, np.uint8).max() > 1:
        raise err(f"{path}: bool data holds bytes other than 0 and 1")
    # astype copies: the result is writable, native-endian and owns its memory
    arr = np.frombuffer(data, dtype=wire).reshape(shape).astype(native)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise err(f"{path}: contains NaN or infinity")
    return arr


def _exact(expected: list):
    def check(shape: list):
        if shape != expected:
            return f"shape {shape} does not match the expected {expected}"
        return None
    return check


def _decode_int(obj: dict, name: str, path: str, low: int = _INT64_MIN,
                high: int = _INT64_MAX) -> int:
    v = obj[name]
    if type(v) is not int:
        raise TrialDecodeError(f"{path}.{name}: expected an int, got {_tname(v)}")
    if not low <= v <= high:
        raise TrialDecodeError(f"{path}.{name}: {v} is outside [{low}, {high}]")
    return v


def _decode_trial(obj: Any, path: str, s: TrialSchema) -> Trial:
    E = TrialDecodeError
    if not isinstance(obj, dict):
        raise E(f"{path}: expected a trial map, got {_tname(obj)}")
    _check_keys(obj, _TRIAL_KEYS, path, E)

    def arr(name: str, shape_ok) -> np.ndarray:
        wire, native = _ARRAY_FIELDS[name]
        return _decode_array(obj[name], f"{path}.{name}", wire, native, shape_ok, E)

    def trial_len(shape: list):
        if len(shape) != 1:
            return f"must be 1-D [T], got shape {shape}"
        if not 1 <= shape[0] <= s.max_trial_len:
            return f"trial length {shape[0]} is outside [1, {s.max_trial_len}]"
        return None

    actions = arr("actions", trial_len)
    T = actions.shape[0]
    obs = arr("obs", _exact([T, s.obs_dim]))
    rewards = arr("rewards", _exact([T]))
    gt = arr("gt", _exact([T]))
    trial_end = arr("trial_end", _exact([T]))
    init_state = arr("init_state", _exact([s.state_size]))

    def burnin_shape(shape: list):
        if len(shape) != 2:
            return f"must be 2-D [N, {s.obs_dim}], got shape {shape}"
        if shape[0] > s.max_burnin:
            return f"burn-in length {shape[0]} exceeds the limit {s.max_burnin}"
        if shape[1] != s.obs_dim and not (shape[0] == 0 and shape[1] == 0):
            return f"shape {shape} does not match [N, {s.obs_dim}]"
        return None

    burnin_obs = arr("burnin_obs", burnin_shape)
    N = burnin_obs.shape[0]
    if N == 0:
        burnin_obs = np.zeros((0, s.obs_dim), np.float32)  # normalise (0, 0) to (0, obs_dim)

    def burnin_state_shape(shape: list):
        if shape == [s.state_size] or (N == 0 and shape == [0]):
            return None
        allowed = f"[{s.state_size}]" + (" or [0]" if N == 0 else "")
        return f"shape {shape} does not match {allowed} (burn-in length {N})"

    burnin_state = arr("burnin_state", burnin_state_shape)

    lo, hi = int(actions.min()), int(actions.max())
    if lo < 0 or hi >= s.num_actions:
        bad = lo if lo < 0 else hi
        raise E(f"{path}.actions: action {bad} is outside [0, {s.num_actions})")
    lo, hi = int(gt.min()), int(gt.max())
    if lo < 0 or hi >= s.num_actions:
        bad = lo if lo < 0 else hi
        raise E(f"{path}.gt: ground-truth action {bad} is outside [0, {s.num_actions})")
    if not trial_end[-1] or trial_end[:-1].any():
        raise E(f"{path}.trial_end: must be True exactly at the last step (index {T - 1}) and "
                f"False elsewhere, got True at {np.flatnonzero(trial_end)[:8].tolist()}")

    scalars = {name: _decode_int(obj, name, path) for name in _INT_FIELDS}
    if not 0 <= scalars["fix_breaks"] <= T:
        raise E(f"{path}.fix_breaks: {scalars['fix_breaks']} is outside [0, T={T}]")
    correct = obj["correct"]
    if type(correct) is not bool:
        raise E(f"{path}.correct: expected a bool, got {_tname(correct)}")

    return Trial(obs=obs, actions=actions, rewards=rewards, gt=gt, trial_end=trial_end,
                 init_state=init_state, burnin_obs=burnin_obs, burnin_state=burnin_state,
                 correct=correct, **scalars)


def decode_trials(payload: bytes, schema: TrialSchema) -> list[Trial]:
    """Parse and validate a trial batch.  Raises :class:`TrialDecodeError` (only) on any
    defect.  ``burnin_obs`` of an empty burn-in is always returned with shape (0, obs_dim);
    every returned array is a writable copy owned by the caller."""
    if not isinstance(schema, TrialSchema):
        raise TypeError(f"schema must be a TrialSchema, got {_tname(schema)}")
    path = "message"
    try:
        msg = _unpack(payload, schema.max_message_bytes, "trials",
                      max(schema.max_trials, 16), TrialDecodeError)
        _check_header(msg, TRIALS_SCHEMA, _TRIALS_TOP_KEYS, TrialDecodeError)
        trials = msg["trials"]
        path = "message.trials"
        if not isinstance(trials, list):
            raise TrialDecodeError(f"{path}: expected a list, got {_tname(trials)}")
        if len(trials) > schema.max_trials:
            raise TrialDecodeError(f"{path}: {len(trials)} trials exceed the limit "
                                   f"{schema.max_trials}")
        out = []
        for i, t in enumerate(trials):
            path = f"trials[{i}]"
            out.append(_decode_trial(t, path, schema))
        return out
    except TrialDecodeError:
        raise
    except Exception as e:  # safety net: nothing but TrialDecodeError may escape
        raise TrialDecodeError(f"{path}: invalid ({_tname(e)}: {_short(str(e), 120)})") from None


def decode_params(payload: bytes, max_bytes: int = 1 << 30) -> tuple[dict[str, np.ndarray], int]:
    """Parse and validate a weight broadcast: returns ``({name: float32 array}, version)``
    (writable copies, in the sender's order).  Raises :class:`ParamsDecodeError` (a
    :class:`TrialDecodeError`) on any defect, including NaN or infinite weights."""
    E = ParamsDecodeError
    path = "params"
    try:
        msg = _unpack(payload, max_bytes, "params", 1 << 20, E)
        _check_header(msg, PARAMS_SCHEMA, _PARAMS_TOP_KEYS, E)
        version = msg["version"]
        if type(version) is not int or not 0 <= version <= _INT64_MAX:
            raise E(f"message.version: expected an int in [0, 2**63), got {_short(version)}")
        params = msg["params"]
        if not isinstance(params, dict):
            raise E(f"message.params: expected a map, got {_tname(params)}")

        def shape_ok(shape: list):
            if len(shape) > _MAX_PARAM_NDIM:
                return f"{len(shape)} dimensions exceed the limit {_MAX_PARAM_NDIM}"
            return None

        out: dict[str, np.ndarray] = {}
        for name, value in params.items():
            path = f"params[{_short(name)}]"
            if not name:
                raise E("message.params: empty parameter name")
            out[name] = _decode_array(value, path, _F4, np.float32, shape_ok, E)
        return out, version
    except TrialDecodeError as e:
        if isinstance(e, ParamsDecodeError):
            raise
        raise E(str(e)) from None
    except Exception as e:
        raise E(f"{path}: invalid ({_tname(e)}: {_short(str(e), 120)})") from None
