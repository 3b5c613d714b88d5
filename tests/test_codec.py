"""Tests for common/codec.py: round trips, every kind of corruption, fuzzing."""
from __future__ import annotations

import copy

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.codec import (ParamsDecodeError, TrialDecodeError, TrialSchema, decode_params,
                          decode_trials, encode_params, encode_trials)
from tests.helpers import assert_only_decode_errors, assert_trials_equal, make_trial, msgpack_paths

OBS, STATE, ACTIONS = 3, 8, 3
SCHEMA = TrialSchema(obs_dim=OBS, state_size=STATE, num_actions=ACTIONS, max_trial_len=500,
                     max_burnin=20, max_trials=100, max_message_bytes=1 << 20)


def _trials(seed: int = 0, n: int = 4) -> list:
    rng = np.random.default_rng(seed)
    return [make_trial(rng, int(rng.integers(1, 50)), OBS, STATE, ACTIONS,
                       burnin=(0 if i % 2 == 0 else int(rng.integers(1, 10)))) for i in range(n)]


def _msg(trials=None) -> dict:
    """A valid message as a Python object, to corrupt and re-pack."""
    return msgpack.unpackb(encode_trials(_trials() if trials is None else trials), raw=False)


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _arr(a: np.ndarray, dtype: str | None = None, shape=None, data: bytes | None = None) -> dict:
    return {"dtype": dtype or a.dtype.str, "shape": list(a.shape) if shape is None else shape,
            "data": a.tobytes() if data is None else data}


def _rejects(obj_or_bytes, match: str | None = None, schema: TrialSchema = SCHEMA) -> str:
    payload = obj_or_bytes if isinstance(obj_or_bytes, bytes) else _pack(obj_or_bytes)
    with pytest.raises(TrialDecodeError, match=match) as info:
        decode_trials(payload, schema)
    return str(info.value)


# ----------------------------------------------------------------------------- round trips

def test_round_trip_all_fields_and_dtypes():
    trials = _trials(1, n=6)
    trials.append(make_trial(np.random.default_rng(5), 1, OBS, STATE, ACTIONS))  # T = 1
    out = decode_trials(encode_trials(trials), SCHEMA)
    assert len(out) == len(trials)
    for a, b in zip(trials, out):
        assert_trials_equal(a, b)
        assert b.obs.dtype == np.float32 and b.actions.dtype == np.int64
        assert b.trial_end.dtype == np.bool_ and b.burnin_obs.shape[1] == OBS
        for name in ("obs", "actions", "rewards", "gt", "trial_end", "init_state",
                     "burnin_obs", "burnin_state"):
            arr = getattr(b, name)
            assert arr.flags.writeable and arr.flags.c_contiguous and arr.flags.owndata, name
        assert b.payload_nbytes() >= a.payload_nbytes()  # (0,0) burn-in became (0,OBS)


def test_empty_burnin_normalised_and_empty_batch():
    t = _trials(2, n=1)[0]
    assert t.burnin_obs.shape == (0, 0)
    (out,) = decode_trials(encode_trials([t]), SCHEMA)
    assert out.burnin_obs.shape == (0, OBS) and out.burnin_state.shape == (0,)
    # an empty burn-in with a full-size state is accepted and kept
    t.burnin_obs = np.zeros((0, OBS), np.float32)
    t.burnin_state = np.ones(STATE, np.float32)
    (out,) = decode_trials(encode_trials([t]), SCHEMA)
    assert out.burnin_state.shape == (STATE,)
    assert decode_trials(encode_trials([]), SCHEMA) == []


def test_encode_converts_dtypes_and_numpy_scalars():
    t = _trials(3, n=1)[0]
    t.obs = t.obs.astype(np.float64)
    t.actions = t.actions.astype(np.int32)
    t.ground_truth = np.int64(2)
    t.correct = np.bool_(True)
    (out,) = decode_trials(encode_trials([t]), SCHEMA)
    assert out.obs.dtype == np.float32 and out.actions.dtype == np.int64
    assert out.ground_truth == 2 and out.correct is True


def test_decode_accepts_bytearray_and_memoryview():
    payload = encode_trials(_trials())
    assert len(decode_trials(bytearray(payload), SCHEMA)) == 4
    assert len(decode_trials(memoryview(payload), SCHEMA)) == 4


def test_params_round_trip():
    rng = np.random.default_rng(0)
    params = {"core.W": rng.standard_normal((4, 5)).astype(np.float32),
              "head.b": rng.standard_normal(7).astype(np.float32),
              "scalar": np.float32(3.5) * np.ones((), np.float32),
              "empty": np.zeros((0, 3), np.float32),
              "f64": rng.standard_normal((2, 2))}
    out, version = decode_params(encode_params(params, 17))
    assert version == 17 and list(out) == list(params)
    for k, v in params.items():
        assert out[k].dtype == np.float32 and out[k].shape == v.shape and out[k].flags.writeable
        np.testing.assert_array_equal(out[k], v.astype(np.float32))


def test_params_rejections():
    good = msgpack.unpackb(encode_params({"w": np.ones(3, np.float32)}, 1), raw=False)
    with pytest.raises(ParamsDecodeError, match="limit"):
        decode_params(encode_params({"w": np.ones(1000, np.float32)}, 1), max_bytes=100)
    for mutate, match in [
        (lambda m: m["params"]["w"].update(dtype="<f8"), "dtype"),
        (lambda m: m["params"]["w"].update(shape=[4]), "needs 16 bytes"),
        (lambda m: m["params"]["w"].update(data=np.full(3, np.nan, np.float32).tobytes()),
         "NaN"),
        (lambda m: m.update(version=-1), "version"),
        (lambda m: m.update(version=True), "version"),
        (lambda m: m.update(schema="mpn-dqn/trials"), "schema"),
        (lambda m: m.update(params=[1, 2]), "params"),
    ]:
        m = copy.deepcopy(good)
        mutate(m)
        with pytest.raises(ParamsDecodeError, match=match):
            decode_params(_pack(m))
    with pytest.raises(TrialDecodeError):          # the documented base class catches it too
        decode_params(b"\xc1")
    with pytest.raises(TrialDecodeError, match="schema"):
        decode_params(encode_trials(_trials()))    # a trial message is not a weight broadcast


# ----------------------------------------------------------------------------- corruption

def test_wrong_dtype():
    m = _msg()
    m["trials"][0]["obs"]["dtype"] = "<f8"
    assert "trials[0].obs" in _rejects(m, "dtype")
    m = _msg()
    m["trials"][1]["actions"]["dtype"] = "<i4"
    assert "trials[1].actions" in _rejects(m, "dtype")
    m = _msg()
    m["trials"][0]["trial_end"]["dtype"] = "<b1"
    _rejects(m, "dtype")


def test_shape_mismatch():
    m = _msg()
    t = m["trials"][0]
    T = t["actions"]["shape"][0]
    obs = np.zeros((T, OBS + 1), np.float32)
    t["obs"] = _arr(obs)
    assert "trials[0].obs" in _rejects(m, "does not match")
    m = _msg()
    m["trials"][0]["rewards"] = _arr(np.zeros(T + 1, np.float32))
    _rejects(m, r"trials\[0\]\.rewards.*does not match")
    m = _msg()
    m["trials"][0]["init_state"] = _arr(np.zeros(STATE - 1, np.float32))
    _rejects(m, r"init_state.*does not match")
    m = _msg()
    m["trials"][1]["burnin_state"] = _arr(np.zeros(0, np.float32))  # burn-in needs a state
    _rejects(m, r"burnin_state")
    m = _msg()
    m["trials"][1]["burnin_obs"] = _arr(np.zeros((3, OBS, 1), np.float32))
    _rejects(m, r"burnin_obs.*2-D")
    m = _msg()
    m["trials"][0]["burnin_obs"] = _arr(np.zeros((SCHEMA.max_burnin + 1, OBS), np.float32))
    _rejects(m, r"burnin_obs.*exceeds")


def test_declared_shape_larger_than_data():
    m = _msg()
    m["trials"][0]["obs"]["shape"][0] = 2 ** 40        # huge declared size, tiny data
    m["trials"][0]["actions"]["shape"][0] = 2 ** 40
    _rejects(m, r"trials\[0\]\.actions")
    m = _msg()
    m["trials"][0]["init_state"]["data"] = m["trials"][0]["init_state"]["data"][:-4]
    _rejects(m, r"init_state.*needs 32 bytes of data, got 28")
    m = _msg()
    m["trials"][0]["obs"]["shape"] = [2 ** 62, 2 ** 62]   # product overflows int64
    _rejects(m, r"trials\[0\]\.obs")
    m = _msg()
    m["trials"][0]["obs"]["shape"] = [-1, OBS]
    _rejects(m, r"obs.*invalid dimension")


def test_non_finite_values():
    for field, bad in (("obs", np.nan), ("rewards", np.inf), ("init_state", -np.inf),
                       ("burnin_obs", np.nan), ("burnin_state", np.nan)):
        m = _msg()
        t = m["trials"][1]                       # trial 1 has a burn-in
        a = np.frombuffer(t[field]["data"], np.float32).copy()
        a[0] = bad
        t[field]["data"] = a.tobytes()
        assert f"trials[1].{field}" in _rejects(m, "NaN or infinity")


def test_action_and_gt_out_of_range():
    for field, bad in (("actions", ACTIONS), ("actions", -1), ("gt", ACTIONS + 5)):
        m = _msg()
        a = np.frombuffer(m["trials"][0][field]["data"], np.int64).copy()
        a[-1] = bad
        m["trials"][0][field]["data"] = a.tobytes()
        assert f"trials[0].{field}" in _rejects(m, "outside")


def test_unknown_missing_and_duplicate_keys():
    m = _msg()
    m["trials"][0]["extra"] = 1
    _rejects(m, r"trials\[0\].*unknown keys \['extra'\]")
    m = _msg()
    del m["trials"][2]["rewards"]
    _rejects(m, r"trials\[2\].*missing keys \['rewards'\]")
    m = _msg()
    m["trials"][0]["obs"]["order"] = "C"
    _rejects(m, r"obs.*unknown keys")
    m = _msg()
    m["extra"] = 1
    _rejects(m, r"message.*unknown keys")
    # duplicate keys can only be made by hand: {"v": 1, "v": 1, ...}
    raw = b"\x84" + _pack("schema") + _pack("mpn-dqn/trials") + (_pack("v") + _pack(1)) * 2 \
        + _pack("trials") + _pack([])
    _rejects(raw, "duplicate map key")
    _rejects(_pack({1: 2}), "payload")   # non-string key


def test_trial_end_wrong():
    for pattern in ("last_false", "extra_true"):
        m = _msg()
        te = np.frombuffer(m["trials"][0]["trial_end"]["data"], np.bool_).copy()
        if pattern == "last_false":
            te[-1] = False
        else:
            te[0] = True
        if len(te) == 1 and pattern == "extra_true":
            continue
        m["trials"][0]["trial_end"]["data"] = te.tobytes()
        _rejects(m, r"trials\[0\]\.trial_end.*exactly at the last step")
    m = _msg()
    m["trials"][0]["trial_end"]["data"] = b"\x02" * len(m["trials"][0]["trial_end"]["data"])
    _rejects(m, r"trial_end.*0 and 1")


def test_trial_length_limits():
    m = _msg()
    t = m["trials"][0]
    for name in ("obs", "actions", "rewards", "gt", "trial_end"):
        shape = t[name]["shape"]
        shape[0] = 0
        t[name]["data"] = b""
    _rejects(m, r"trials\[0\]\.actions.*outside \[1, 500\]")
    long = make_trial(np.random.default_rng(0), 501, OBS, STATE, ACTIONS)
    _rejects(encode_trials([long]), r"actions.*outside \[1, 500\]")


def test_scalar_fields():
    for field, value, match in (("correct", 1, "expected a bool"),
                                ("ground_truth", True, "expected an int"),
                                ("episode_id", 2 ** 63, "outside"),
                                ("actor_id", 1.5, "expected an int"),
                                ("weights_version", None, "expected an int"),
                                ("fix_breaks", 10 ** 6, "fix_breaks"),
                                ("fix_breaks", -1, "fix_breaks")):
        m = _msg()
        m["trials"][0][field] = value
        assert f"trials[0].{field}" in _rejects(m, match)
    m = _msg()
    m["trials"][0]["obs"] = [1.0, 2.0]
    _rejects(m, r"trials\[0\]\.obs.*array map")
    m = _msg()
    m["trials"][0]["obs"]["data"] = "text"
    _rejects(m, r"obs.*binary")


def test_oversize_message():
    payload = encode_trials(_trials())
    small = TrialSchema(OBS, STATE, ACTIONS, max_message_bytes=len(payload) - 1)
    _rejects(payload, "exceeds the limit", schema=small)
    few = TrialSchema(OBS, STATE, ACTIONS, max_trials=3)
    _rejects(payload, r"payload|trials", schema=few)
    with pytest.raises(TrialDecodeError):
        decode_trials(b"\x00" * (SCHEMA.max_message_bytes + 1), SCHEMA)


def test_declared_container_sizes_do_not_allocate():
    # array / map / bin / str headers that claim 4 GiB with no data behind them
    for raw in (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
                b"\xdb\xff\xff\xff\xff", b"\x91" * 100_000):
        _rejects(raw, "payload")


def test_truncated_and_garbage_bytes():
    payload = encode_trials(_trials())
    for cut in (1, 10, len(payload) // 2, len(payload) - 1):
        _rejects(payload[:cut], "payload")
    _rejects(payload + b"\x00", "payload")     # trailing data
    _rejects(b"", "empty")
    with pytest.raises(TrialDecodeError):
        decode_trials("not bytes", SCHEMA)       # type: ignore[arg-type]


def test_non_map_top_level_and_wrong_header():
    _rejects(_pack([1, 2, 3]), "top level must be a map")
    _rejects(_pack(None), "top level must be a map")
    m = _msg()
    m["schema"] = "other/trials"
    _rejects(m, "message.schema")
    m = _msg()
    m["schema"] = b"mpn-dqn/trials"
    _rejects(m, "message.schema")
    m = _msg()
    m["v"] = 2
    _rejects(m, "message.v")
    m = _msg()
    m["v"] = True
    _rejects(m, "message.v")
    m = _msg()
    m["trials"] = {"0": 1}
    _rejects(m, "message.trials")
    m = _msg()
    m["trials"][1] = 5
    _rejects(m, r"trials\[1\].*trial map")


# ----------------------------------------------------------------------------- fuzzing

_FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_leaves = (st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1)
           | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=64)
           | st.sampled_from(["schema", "v", "trials", "obs", "dtype", "shape", "data", "<f4",
                              "<i8", "|b1", "mpn-dqn/trials", 1, 0, 3]))
_structures = st.recursive(
    _leaves, lambda kids: st.lists(kids, max_size=5)
    | st.dictionaries(st.text(max_size=10) | st.sampled_from(["schema", "v", "trials"]), kids,
                      max_size=5), max_leaves=30)


@_FUZZ
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(data):
    assert_only_decode_errors(data, SCHEMA)
    try:
        decode_params(data)
    except TrialDecodeError:
        pass


@_FUZZ
@given(_structures)
def test_fuzz_arbitrary_msgpack(obj):
    assert_only_decode_errors(_pack(obj), SCHEMA)
    assert_only_decode_errors(_pack({"schema": "mpn-dqn/trials", "v": 1, "trials": [obj]}), SCHEMA)


_VALID = encode_trials(_trials(7, n=2))
_VALID_OBJ = msgpack.unpackb(_VALID, raw=False)


_ALL_PATHS = [p for p in msgpack_paths(_VALID_OBJ) if p]


@_FUZZ
@given(st.sampled_from(_ALL_PATHS), _structures)
def test_fuzz_mutated_valid_message(path, value):
    m = copy.deepcopy(_VALID_OBJ)
    target = m
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    assert_only_decode_errors(_pack(m), SCHEMA)


@_FUZZ
@given(st.integers(0, len(_VALID) - 1), st.integers(0, 255))
def test_fuzz_flipped_byte(pos, byte):
    data = bytearray(_VALID)
    data[pos] = byte
    assert_only_decode_errors(bytes(data), SCHEMA)
