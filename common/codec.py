"""msgpack wire format for trial batches and weight broadcasts (no pickle anywhere).

Trial batch message, format version 2 (columnar; one msgpack map)::

    {"schema": "mpn-dqn/trials", "v": 2, <column>: <array map>, ...}

One message carries a batch of N >= 0 trials, in order, as columns rather than one map per
trial.  The map holds exactly ``schema``, ``v`` and the 18 columns below, no other keys.  Every
column is an array map ``{"dtype": str, "shape": [int, ...], "data": bin}`` (exactly these
keys) whose raw bytes are in C order, little-endian, in the column's fixed wire dtype (any
other dtype is rejected).  With T_i the length of trial i, B_i its burn-in length, O and S the
schema's obs_dim and state_size::

    column              dtype  shape            content
    lengths             <i8    [N]              T_i, each in [1, max_trial_len]
    obs                 <f4    [sum T_i, O]     the trials' obs, concatenated in trial order
    actions             <i8    [sum T_i]        actions, each in [0, num_actions)
    rewards             <f4    [sum T_i]        rewards
    gt                  <i8    [sum T_i]        gt, each in [0, num_actions)
    init_state          <f4    [N, S]           init_state, one row per trial
    ground_truth        <i8    [N]              one column per int field; fix_breaks in
    fix_breaks          <i8    [N]                [0, T_i], the others any int64
    episode_id          <i8    [N]
    actor_id            <i8    [N]
    env_id              <i8    [N]
    trial_index         <i8    [N]
    weights_version     <i8    [N]
    correct             |b1    [N]              bytes 0 or 1
    burnin_lengths      <i8    [N]              B_i, each in [0, max_burnin]
    burnin_obs          <f4    [sum B_i, O]     the burn-in observations, concatenated
    burnin_has_state    |b1    [N]              1: trial i sends a burnin_state row (must be 1
                                                  where B_i > 0; may be 1 where B_i == 0)
    burnin_state        <f4    [K, S]           those rows, in trial order (K = sum of flags)

A 2-D column with no rows may also be declared [0, 0] (an encoder of an empty batch knows no O
or S).  Every float is finite.  ``trial_end`` is not sent: it is True exactly at a trial's last
step and the decoder rebuilds it.  An empty burn-in decodes to ``burnin_obs`` of shape (0, O)
and a ``burnin_state`` of shape (0,) (flag 0) or (S,) (flag 1: the state sent is kept), as
version 1 decoded it.  A version 1 message (``{"schema", "v": 1, "trials": [per-trial maps]}``)
is rejected with a message saying the sender runs an older mpn-dqn.

Weight broadcast message (format version 1, unchanged)::

    {"schema": "mpn-dqn/params", "v": 1, "version": int, "params": {name: float32 array map}}

Decoding is strict: the payload size is checked before anything is parsed, msgpack runs with
length limits so no declared size can cause a large allocation, every column's declared shape
is checked against its data length and against the other columns (N, the sums of the lengths,
O and S) before any array is made, and every value's range and finiteness is checked (one
numpy pass per step or state column, the short per-trial columns as lists).  Any defect raises
:class:`TrialDecodeError` (for weights its subclass :class:`ParamsDecodeError`) with a message
naming the field, and for a defect within one trial the trial and step, e.g.
``trials[3].actions: action 7 is outside [0, 3) (step 2 of 5)``; no other exception escapes.
Decoded arrays are writable and native-endian; the trials of one message are views into fresh
per-column copies made for the caller (never into the received bytes), and no two trials share
memory.
"""
from __future__ import annotations

import math
import operator
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Iterable

import msgpack
import numpy as np

from mpn_dqn.common.trial import Trial

__all__ = ["TrialDecodeError", "ParamsDecodeError", "TrialSchema", "encode_trials",
           "decode_trials", "encode_params", "decode_params", "TRIALS_SCHEMA", "PARAMS_SCHEMA",
           "FORMAT_VERSION", "PARAMS_FORMAT_VERSION"]

TRIALS_SCHEMA = "mpn-dqn/trials"
PARAMS_SCHEMA = "mpn-dqn/params"
FORMAT_VERSION = 2           # the trial batch format (columnar since 2)
PARAMS_FORMAT_VERSION = 1    # the weight broadcast format

_INT64_MAX = 2 ** 63 - 1

_F4 = np.dtype("<f4")
_I8 = np.dtype("<i8")
_B1 = np.dtype("|b1")

_INT_FIELDS = ("ground_truth", "fix_breaks", "episode_id", "actor_id", "env_id", "trial_index",
               "weights_version")
# every column of a version 2 message: wire dtype (the only one accepted) and number of dims
_COLUMNS: dict[str, tuple[np.dtype, int]] = {
    "lengths": (_I8, 1),
    "obs": (_F4, 2), "actions": (_I8, 1), "rewards": (_F4, 1), "gt": (_I8, 1),
    "init_state": (_F4, 2),
    **{name: (_I8, 1) for name in _INT_FIELDS},
    "correct": (_B1, 1),
    "burnin_lengths": (_I8, 1), "burnin_obs": (_F4, 2),
    "burnin_has_state": (_B1, 1), "burnin_state": (_F4, 2),
}
_COLUMN_SPECS = {name: (wire.str, ndim, wire.itemsize) for name, (wire, ndim) in _COLUMNS.items()}
_ARRAY_KEYS = frozenset({"dtype", "shape", "data"})
_TRIALS_TOP_KEYS = frozenset({"schema", "v"}) | frozenset(_COLUMNS)
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
    return {"dtype": wire.str, "shape": arr.shape, "data": arr.tobytes()}

# one C-level call gathers every field a message needs from a trial
_GATHER = operator.attrgetter("obs", "actions", "rewards", "gt", "init_state", "burnin_obs",
                              "burnin_state", "correct", *_INT_FIELDS)


def _concat(parts: tuple | list, wire: np.dtype, name: str) -> np.ndarray:
    try:
        return np.concatenate(parts, dtype=wire, casting="unsafe")
    except (ValueError, TypeError) as e:
        raise ValueError(f"encode_trials: the trials' {name} arrays do not form one column "
                         f"({_short(str(e), 200)})") from None


def _rows(parts: tuple | list, wire: np.dtype, name: str) -> np.ndarray:
    """One row per part: [len(parts), ...] (np.array refuses parts of differing shapes)."""
    try:
        return np.array(parts, dtype=wire)
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"encode_trials: the trials' {name} values do not form one column "
                         f"({_short(str(e), 200)})") from None


def encode_trials(trials: Iterable[Trial]) -> bytes:
    """Serialise trials to one (version 2, columnar) message.  Arrays are converted to their
    wire dtype (float32, int64, bool) and concatenated column by column with numpy (one
    concatenation per column, no per-trial dict), and msgpack copies each column once into
    the message; nothing is validated here beyond what the conversion needs (the receiver
    validates).  ``trial_end`` is not sent (the receiver rebuilds it).  Raises ValueError if
    the trials' arrays cannot be put in columns: differing obs widths or state sizes, or a
    trial whose obs, rewards or gt do not have one row per action."""
    trials = trials if isinstance(trials, (list, tuple)) else list(trials)
    n = len(trials)
    cols: dict[str, np.ndarray]
    if n == 0:
        cols = {name: np.zeros((0,) * ndim, wire) for name, (wire, ndim) in _COLUMNS.items()}
    else:
        (obs, actions, rewards, gt, init, b_obs, b_state, correct,
         *ints) = zip(*map(_GATHER, trials))
        lengths = list(map(len, actions))
        for name, parts in (("obs", obs), ("rewards", rewards), ("gt", gt)):
            # in one column, a trial's extra row would silently become the next trial's
            if list(map(len, parts)) != lengths:
                i = next(i for i, (p, T) in enumerate(zip(parts, lengths)) if len(p) != T)
                raise ValueError(f"encode_trials: trials[{i}].{name} has {len(parts[i])} rows "
                                 f"but the trial has {lengths[i]} actions")
        obs_c = _concat(obs, _F4, "obs")
        init_c = _rows(init, _F4, "init_state")
        b_len = np.fromiter(map(len, b_obs), _I8, n)
        has = np.fromiter(map(len, b_state), _I8, n) != 0
        if b_len.any():
            b_obs_c = _concat([b for b, k in zip(b_obs, b_len.tolist()) if k], _F4,
                              "burnin_obs")
        else:
            b_obs_c = np.zeros((0, obs_c.shape[1] if obs_c.ndim == 2 else 0), _F4)
        if has.any():
            b_state_c = _rows([s for s, h in zip(b_state, has.tolist()) if h], _F4,
                              "burnin_state")
        else:
            b_state_c = np.zeros((0, init_c.shape[1] if init_c.ndim == 2 else 0), _F4)
        cols = {"lengths": np.array(lengths, _I8),
                "obs": obs_c,
                "actions": _concat(actions, _I8, "actions"),
                "rewards": _concat(rewards, _F4, "rewards"),
                "gt": _concat(gt, _I8, "gt"),
                "init_state": init_c,
                **dict(zip(_INT_FIELDS, _rows(ints, _I8, "int field"))),
                "correct": _rows(correct, _B1, "correct"),
                "burnin_lengths": b_len,
                "burnin_obs": b_obs_c,
                "burnin_has_state": has,
                "burnin_state": b_state_c}
    # every column is built in its wire dtype; msgpack writes each C-contiguous buffer as bin
    # (the bytes ``tobytes()`` would give), so each column is copied once, into the message
    msg: dict[str, Any] = {"schema": TRIALS_SCHEMA, "v": FORMAT_VERSION}
    for name, arr in cols.items():
        msg[name] = {"dtype": arr.dtype.str, "shape": arr.shape, "data": arr.data}
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
    msg = {"schema": PARAMS_SCHEMA, "v": PARAMS_FORMAT_VERSION, "version": version, "params": out}
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
    if obj.keys() == expected:
        return
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


def _check_header(obj: Any, schema: str, keys: frozenset, version: int,
                  err: type[TrialDecodeError]) -> None:
    if not isinstance(obj, dict):
        raise err(f"message: top level must be a map, got {_tname(obj)}")
    got = obj.get("schema")
    if not isinstance(got, str) or got != schema:
        raise err(f"message.schema: expected {schema!r}, got {_short(got)}")
    if "v" in obj:          # the version first: another version has other keys
        v = obj["v"]
        if type(v) is not int or v != version:
            if type(v) is int and 1 <= v < version:
                why = (f"the sender runs an older mpn-dqn (this decoder reads version "
                       f"{version})")
            elif type(v) is int and v > version:
                why = (f"the sender runs a newer mpn-dqn (this decoder reads version "
                       f"{version})")
            else:
                why = f"this decoder reads version {version}"
            raise err(f"message.v: unsupported format version {_short(v)} of {schema!r}: "
                      f"{why}; both sides must run the same mpn-dqn version")
    _check_keys(obj, keys, "message", err)


def _array_map_shape(obj: Any, path: str, wire: np.dtype, err: type[TrialDecodeError]) -> list:
    """Check an array map's keys, dtype and declared shape (ints in [0, 2**63)); return the shape."""
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
    return shape


def _array_map_data(obj: dict, path: str, wire: np.dtype, shape: list,
                    err: type[TrialDecodeError]) -> bytes:
    """The array map's data, checked to be binary of exactly the size ``shape`` declares."""
    data = obj["data"]
    if not isinstance(data, bytes):
        raise err(f"{path}: data must be binary, got {_tname(data)}")
    need = math.prod(shape) * wire.itemsize
    if need != len(data):
        raise err(f"{path}: shape {shape} needs {need} bytes of data, got {len(data)}")
    return data


def _decode_param(obj: Any, path: str, err: type[TrialDecodeError]) -> np.ndarray:
    """Validate a float32 array map of at most ``_MAX_PARAM_NDIM`` dimensions (checked before
    any array is created) and build a fresh native-endian array."""
    shape = _array_map_shape(obj, path, _F4, err)
    if len(shape) > _MAX_PARAM_NDIM:
        raise err(f"{path}: {len(shape)} dimensions exceed the limit {_MAX_PARAM_NDIM}")
    arr = _own(_array_map_data(obj, path, _F4, shape, err), shape, _F4, np.float32)
    if not np.isfinite(arr).all():
        raise err(f"{path}: contains NaN or infinity")
    return arr


# --- trial batches (version 2) -------------------------------------------------------------

_E = TrialDecodeError


def _raw_column(msg: dict, name: str) -> tuple[list, bytes]:
    """Check one column's array map (dtype, number of dims, shape against its data length)
    without building anything; returns (shape, data)."""
    wire_str, ndim, itemsize = _COLUMN_SPECS[name]
    obj = msg[name]
    if type(obj) is dict and obj.keys() == _ARRAY_KEYS:      # the common case, in few steps
        dt, shape, data = obj["dtype"], obj["shape"], obj["data"]
        if type(dt) is str and dt == wire_str and type(shape) is list and len(shape) == ndim \
                and type(data) is bytes:
            n = itemsize
            for d in shape:
                if type(d) is not int or not 0 <= d <= _INT64_MAX:
                    break
                n *= d
            else:
                if n == len(data):
                    return shape, data
    # the thorough path, every check with its own message: it raises, naming what is wrong
    path = f"message.{name}"
    wire = _COLUMNS[name][0]
    shape = _array_map_shape(obj, path, wire, _E)
    if len(shape) != ndim:
        raise _E(f"{path}: must be {ndim}-D, got shape {_short(shape)}")
    return shape, _array_map_data(obj, path, wire, shape, _E)


def _expect(name: str, shape: list, expected: list, why: str, *args: Any) -> None:
    """``shape`` must equal ``expected``; a 2-D column with no rows may also be [0, 0].  The
    reason, ``why.format(*args)``, is only formatted for the error."""
    if shape != expected and not (len(expected) == 2 and expected[0] == 0 and shape == [0, 0]):
        raise _E(f"message.{name}: shape {shape} does not match the expected {expected} "
                 f"({why.format(*args)})")


def _ints(data: bytes) -> list:
    """A checked int64 column as Python ints (per-trial columns are short: their checks run
    on lists, which beats numpy's per-call cost at the batch sizes actors send)."""
    return np.frombuffer(data, _I8).tolist()


def _bools(data: bytes, name: str) -> list:
    """A checked bool column as Python bools; its bytes must all be 0 or 1."""
    if data.translate(None, b"\x00\x01"):
        i, v = next((i, v) for i, v in enumerate(data) if v > 1)
        raise _E(f"trials[{i}].{name}: expected a bool (byte 0 or 1), got byte {v}")
    return np.frombuffer(data, _B1).tolist()


def _own(data: bytes, shape: list, wire: np.dtype, native: type) -> np.ndarray:
    """A fresh, writable, native-endian copy of a checked column (never a view of ``data``)."""
    return np.frombuffer(data, wire).reshape(shape).astype(native)


def _finite(arr: np.ndarray, what: str, locate) -> None:
    """Every element of the float32 ``arr`` is finite; else name the trial: ``locate(row)``
    returns (trial index, where within the trial)."""
    if not arr.size:
        return
    finite = np.isfinite(arr)
    if finite.all():
        return
    row = int(np.flatnonzero(~finite.reshape(-1))[0]) // (arr.shape[1] if arr.ndim == 2 else 1)
    i, where = locate(row)
    raise _E(f"trials[{i}].{what}: contains NaN or infinity{where}")


def _in_range(arr: np.ndarray, what: str, label: str, high: int, locate) -> None:
    """Every element of the int64 ``arr`` is in [0, high) (one reduction: as unsigned, the
    negative ones are huge)."""
    if not arr.size or int(arr.view(np.uint64).max()) < high:
        return
    row = int(np.flatnonzero((arr < 0) | (arr >= high))[0])
    i, where = locate(row)
    raise _E(f"trials[{i}].{what}: {label} {int(arr[row])} is outside [0, {high}){where}")


def _decode_batch(msg: dict, s: TrialSchema) -> list[Trial]:
    raw = {name: _raw_column(msg, name) for name in _COLUMNS}
    shape = {name: r[0] for name, r in raw.items()}
    data = {name: r[1] for name, r in raw.items()}

    # the batch size and the trial lengths
    N = shape["lengths"][0]
    if N > s.max_trials:
        raise _E(f"message.lengths: {N} trials exceed the limit {s.max_trials}")
    lengths = _ints(data["lengths"])
    if N and (min(lengths) < 1 or max(lengths) > s.max_trial_len):
        i, v = next((i, v) for i, v in enumerate(lengths) if not 1 <= v <= s.max_trial_len)
        raise _E(f"trials[{i}].length: trial length {v} is outside [1, {s.max_trial_len}] "
                 f"(message.lengths[{i}])")
    for name in (*_INT_FIELDS, "correct", "burnin_lengths", "burnin_has_state"):
        _expect(name, shape[name], [N], "one per trial, {} trials in message.lengths", N)
    _expect("init_state", shape["init_state"], [N, s.state_size],
            "{} trials, state_size {}", N, s.state_size)

    # the step columns hold exactly the trials' steps
    ends = list(accumulate(lengths))             # Python ints: exact
    rows = shape["actions"][0]
    total = ends[-1] if N else 0
    if total != rows:
        raise _E(f"message.lengths: the trial lengths sum to {total} but the step columns "
                 f"have {rows} rows (message.actions has shape {shape['actions']})")
    _expect("obs", shape["obs"], [rows, s.obs_dim], "{} steps, obs_dim {}", rows, s.obs_dim)
    for name in ("rewards", "gt"):
        _expect(name, shape[name], [rows], "{} steps", rows)

    # burn-in
    b_len = _ints(data["burnin_lengths"])
    if N and (min(b_len) < 0 or max(b_len) > s.max_burnin):
        i, v = next((i, v) for i, v in enumerate(b_len) if not 0 <= v <= s.max_burnin)
        raise _E(f"trials[{i}].burnin_obs: burn-in length {v} "
                 + ("is negative" if v < 0 else f"exceeds the limit {s.max_burnin}")
                 + f" (message.burnin_lengths[{i}])")
    has = _bools(data["burnin_has_state"], "burnin_has_state")
    for i, (b, h) in enumerate(zip(b_len, has)):
        if b and not h:
            raise _E(f"trials[{i}].burnin_state: a burn-in of length {b} needs a state of "
                     f"shape [{s.state_size}], but message.burnin_has_state[{i}] is false")
    b_ends = list(accumulate(b_len))
    b_rows = b_ends[-1] if N else 0
    _expect("burnin_obs", shape["burnin_obs"], [b_rows, s.obs_dim],
            "the burn-in lengths sum to {}, obs_dim {}", b_rows, s.obs_dim)
    K = sum(has)
    _expect("burnin_state", shape["burnin_state"], [K, s.state_size],
            "{} trials set burnin_has_state, state_size {}", K, s.state_size)

    # the per-trial values
    correct = _bools(data["correct"], "correct")
    ints = [_ints(data[name]) for name in _INT_FIELDS]
    fix = ints[_INT_FIELDS.index("fix_breaks")]
    for i, (f, n) in enumerate(zip(fix, lengths)):
        if not 0 <= f <= n:
            raise _E(f"trials[{i}].fix_breaks: {f} is outside [0, T={n}]")
    # (the other int columns may hold any int64, as in version 1)

    # every shape is now consistent with the data: build the columns and check the values
    def at_step(row: int):
        i = bisect_right(ends, row)
        return i, f" (step {row - ends[i] + lengths[i]} of {lengths[i]})"

    def at_trial(row: int):
        return row, ""

    def at_burnin(row: int):
        i = bisect_right(b_ends, row)
        return i, f" (burn-in step {row - b_ends[i] + b_len[i]} of {b_len[i]})"

    def at_state(row: int):
        return [i for i, h in enumerate(has) if h][row], ""

    obs = _own(data["obs"], [rows, s.obs_dim], _F4, np.float32)
    _finite(obs, "obs", at_step)
    rewards = _own(data["rewards"], [rows], _F4, np.float32)
    _finite(rewards, "rewards", at_step)
    actions = _own(data["actions"], [rows], _I8, np.int64)
    _in_range(actions, "actions", "action", s.num_actions, at_step)
    gt = _own(data["gt"], [rows], _I8, np.int64)
    _in_range(gt, "gt", "ground-truth action", s.num_actions, at_step)
    init = _own(data["init_state"], [N, s.state_size], _F4, np.float32)
    _finite(init, "init_state", at_trial)
    b_obs = _own(data["burnin_obs"], [b_rows, s.obs_dim], _F4, np.float32)
    _finite(b_obs, "burnin_obs", at_burnin)
    b_state = _own(data["burnin_state"], [K, s.state_size], _F4, np.float32)
    _finite(b_state, "burnin_state", at_state)
    trial_end = np.zeros(rows, np.bool_)

    # the trials: disjoint views into the columns
    out = []
    g_truth, fix, episode, actor, env, index, version = ints
    k = a = b = 0
    for i in range(N):
        e, c = ends[i], b_ends[i]
        trial_end[e - 1] = True
        if has[i]:
            state = b_state[k]
            k += 1
        else:
            state = np.zeros(0, np.float32)
        out.append(Trial(obs=obs[a:e], actions=actions[a:e], rewards=rewards[a:e], gt=gt[a:e],
                         trial_end=trial_end[a:e], init_state=init[i], burnin_obs=b_obs[b:c],
                         burnin_state=state, ground_truth=g_truth[i], correct=correct[i],
                         fix_breaks=fix[i], episode_id=episode[i], actor_id=actor[i],
                         env_id=env[i], trial_index=index[i], weights_version=version[i]))
        a, b = e, c
    return out


def decode_trials(payload: bytes, schema: TrialSchema) -> list[Trial]:
    """Parse and validate a trial batch (format version 2).  Raises :class:`TrialDecodeError`
    (only) on any defect.  ``trial_end`` is rebuilt from the lengths; ``burnin_obs`` of an
    empty burn-in is always returned with shape (0, obs_dim).  Every returned array is
    writable, native-endian and shares no memory with the payload or with another trial (the
    trials of one message are views into fresh per-column copies)."""
    if not isinstance(schema, TrialSchema):
        raise TypeError(f"schema must be a TrialSchema, got {_tname(schema)}")
    path = "message"
    try:
        # (arrays are allowed up to max_trials long only so that a version 1 message, whose
        # trials are one list, still parses and is refused with the version message)
        msg = _unpack(payload, schema.max_message_bytes, "trials",
                      max(schema.max_trials, 16), TrialDecodeError)
        _check_header(msg, TRIALS_SCHEMA, _TRIALS_TOP_KEYS, FORMAT_VERSION, TrialDecodeError)
        return _decode_batch(msg, schema)
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
        _check_header(msg, PARAMS_SCHEMA, _PARAMS_TOP_KEYS, PARAMS_FORMAT_VERSION, E)
        version = msg["version"]
        if type(version) is not int or not 0 <= version <= _INT64_MAX:
            raise E(f"message.version: expected an int in [0, 2**63), got {_short(version)}")
        params = msg["params"]
        if not isinstance(params, dict):
            raise E(f"message.params: expected a map, got {_tname(params)}")
        out: dict[str, np.ndarray] = {}
        for name, value in params.items():
            path = f"params[{_short(name)}]"
            if not name:
                raise E("message.params: empty parameter name")
            out[name] = _decode_param(value, path, E)
        return out, version
    except TrialDecodeError as e:
        if isinstance(e, ParamsDecodeError):
            raise
        raise E(str(e)) from None
    except Exception as e:
        raise E(f"{path}: invalid ({_tname(e)}: {_short(str(e), 120)})") from None
