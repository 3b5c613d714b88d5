"""Tests for common/codec.py: round trips, the columnar (version 2) layout, every kind of
corruption, fuzzing."""
from __future__ import annotations

import copy

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpn_dqn.common.codec import (FORMAT_VERSION, ParamsDecodeError, TrialDecodeError, TrialSchema,
                          decode_params, decode_trials, encode_params, encode_trials)
from mpn_dqn.common.trial import Trial
from tests.helpers import assert_only_decode_errors, assert_trials_equal, make_trial, msgpack_paths

OBS, STATE, ACTIONS = 3, 8, 3
SCHEMA = TrialSchema(obs_dim=OBS, state_size=STATE, num_actions=ACTIONS, max_trial_len=500,
                     max_burnin=20, max_trials=100, max_message_bytes=1 << 20)
ARRAY_FIELDS = ("obs", "actions", "rewards", "gt", "trial_end", "init_state", "burnin_obs",
                "burnin_state")
INT_FIELDS = ("ground_truth", "fix_breaks", "episode_id", "actor_id", "env_id", "trial_index",
              "weights_version")
COLUMNS = ("lengths", "obs", "actions", "rewards", "gt", "init_state", *INT_FIELDS, "correct",
           "burnin_lengths", "burnin_obs", "burnin_has_state", "burnin_state")
WIRE = {"obs": "<f4", "rewards": "<f4", "init_state": "<f4", "burnin_obs": "<f4",
        "burnin_state": "<f4", "correct": "|b1", "burnin_has_state": "|b1"}


def _trials(seed: int = 0, n: int = 4) -> list:
    """Trials 1, 3, ... have a burn-in (and a burn-in state), 0, 2, ... the Trial defaults."""
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


def _col(m: dict, name: str) -> np.ndarray:
    """A column of message ``m`` as a writable array."""
    c = m[name]
    return np.frombuffer(c["data"], WIRE.get(name, "<i8")).reshape(c["shape"]).copy()


def _put(m: dict, name: str, a: np.ndarray) -> None:
    """Replace a column (keeping its wire dtype, shape from ``a``)."""
    m[name] = _arr(np.ascontiguousarray(a, dtype=WIRE.get(name, "<i8")))


def _steps(m: dict, i: int) -> tuple[int, int]:
    """The rows of trial ``i`` in the step columns."""
    ends = np.cumsum(_col(m, "lengths"))
    return int(ends[i - 1]) if i else 0, int(ends[i])


def _rejects(obj_or_bytes, match: str | None = None, schema: TrialSchema = SCHEMA) -> str:
    payload = obj_or_bytes if isinstance(obj_or_bytes, bytes) else _pack(obj_or_bytes)
    with pytest.raises(TrialDecodeError, match=match) as info:
        decode_trials(payload, schema)
    return str(info.value)


def _v1_message(trials: list) -> bytes:
    """A version 1 message as an older mpn-dqn sent it: one map per trial."""
    def arr(a, dtype):
        a = np.ascontiguousarray(a, dtype=dtype)
        return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}
    out = []
    for t in trials:
        obj = {name: arr(getattr(t, name), "<i8" if name in ("actions", "gt") else
                         "|b1" if name == "trial_end" else "<f4") for name in ARRAY_FIELDS}
        obj.update({name: int(getattr(t, name)) for name in INT_FIELDS})
        obj["correct"] = bool(t.correct)
        out.append(obj)
    return _pack({"schema": "mpn-dqn/trials", "v": 1, "trials": out})


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
        for name in ARRAY_FIELDS:
            arr = getattr(b, name)
            assert arr.flags.writeable and arr.flags.c_contiguous, name
            assert arr.dtype.isnative, name
        assert b.payload_nbytes() >= a.payload_nbytes()  # (0,0) burn-in became (0,OBS)
        assert type(b.correct) is bool and all(type(getattr(b, f)) is int for f in INT_FIELDS)


def test_decoded_arrays_are_the_callers_own():
    trials = _trials(2, n=5)
    payload = bytearray(encode_trials(trials))
    out = decode_trials(payload, SCHEMA)
    payload[:] = b"\xff" * len(payload)                 # the received bytes are reused
    for a, b in zip(trials, out):
        assert_trials_equal(a, b)
    # no two trials share memory: writing one leaves the others as they were
    for i, t in enumerate(out):
        for name in ARRAY_FIELDS:
            for u in out[i + 1:]:
                assert not np.shares_memory(getattr(t, name), getattr(u, name)), name
    for i in range(len(out)):
        out = decode_trials(bytes(encode_trials(trials)), SCHEMA)
        t = out[i]
        for name in ARRAY_FIELDS:
            getattr(t, name)[...] = 1
        assert (t.obs == 1).all() and t.trial_end.all()
        for j, (a, b) in enumerate(zip(trials, out)):
            if j != i:
                assert_trials_equal(a, b)        # the others are untouched


def test_the_wire_layout_is_columnar():
    trials = _trials(3, n=5)
    trials[2].burnin_state = np.ones(STATE, np.float32)     # empty burn-in, state sent
    payload = encode_trials(trials)
    m = msgpack.unpackb(payload, raw=False)
    assert _pack(m) == payload                         # plain msgpack, nothing of our own
    assert set(m) == {"schema", "v", *COLUMNS} and m["v"] == FORMAT_VERSION == 2
    assert "trial_end" not in m and "trials" not in m
    for name in COLUMNS:
        assert set(m[name]) == {"dtype", "shape", "data"}
        assert m[name]["dtype"] == WIRE.get(name, "<i8"), name
    np.testing.assert_array_equal(_col(m, "lengths"), [t.length for t in trials])
    np.testing.assert_array_equal(_col(m, "obs"), np.concatenate([t.obs for t in trials]))
    np.testing.assert_array_equal(_col(m, "actions"), np.concatenate([t.actions for t in trials]))
    np.testing.assert_array_equal(_col(m, "init_state"), np.stack([t.init_state for t in trials]))
    np.testing.assert_array_equal(_col(m, "episode_id"), [t.episode_id for t in trials])
    np.testing.assert_array_equal(_col(m, "correct"), [t.correct for t in trials])
    np.testing.assert_array_equal(_col(m, "burnin_lengths"), [len(t.burnin_obs) for t in trials])
    assert _col(m, "burnin_lengths").tolist()[::2] == [0, 0, 0]
    np.testing.assert_array_equal(_col(m, "burnin_obs"),
                                  np.concatenate([trials[1].burnin_obs, trials[3].burnin_obs]))
    np.testing.assert_array_equal(_col(m, "burnin_has_state"), [0, 1, 1, 1, 0])
    np.testing.assert_array_equal(
        _col(m, "burnin_state"),
        np.stack([trials[1].burnin_state, trials[2].burnin_state, trials[3].burnin_state]))


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


def test_round_trip_mixing_trials_with_and_without_burnin():
    rng = np.random.default_rng(11)
    default = make_trial(rng, 4, OBS, STATE, ACTIONS)                     # (0, 0) and (0,)
    collector = make_trial(rng, 7, OBS, STATE, ACTIONS)                   # (0, O) and (0,)
    collector.burnin_obs = np.zeros((0, OBS), np.float32)
    burn = make_trial(rng, 3, OBS, STATE, ACTIONS, burnin=6)
    state_only = make_trial(rng, 9, OBS, STATE, ACTIONS)                  # (0, O) and (S,)
    state_only.burnin_obs = np.zeros((0, OBS), np.float32)
    state_only.burnin_state = rng.standard_normal(STATE).astype(np.float32)
    longest = make_trial(rng, 1, OBS, STATE, ACTIONS, burnin=SCHEMA.max_burnin)
    batch = [default, burn, collector, state_only, longest, burn, default]
    out = decode_trials(encode_trials(batch), SCHEMA)
    expected = [((0, OBS), (0,)), ((6, OBS), (STATE,)), ((0, OBS), (0,)),
                ((0, OBS), (STATE,)), ((SCHEMA.max_burnin, OBS), (STATE,)),
                ((6, OBS), (STATE,)), ((0, OBS), (0,))]
    assert len(out) == len(batch)
    for a, b, (obs_shape, state_shape) in zip(batch, out, expected):
        assert_trials_equal(a, b)
        assert b.burnin_obs.shape == obs_shape and b.burnin_obs.dtype == np.float32
        assert b.burnin_state.shape == state_shape and b.burnin_state.dtype == np.float32
        np.testing.assert_array_equal(b.burnin_obs.reshape(-1), a.burnin_obs.reshape(-1))
        np.testing.assert_array_equal(b.burnin_state, a.burnin_state)
        np.testing.assert_array_equal(b.trial_end, np.arange(a.length) == a.length - 1)


def test_trial_end_is_rebuilt_not_sent():
    t = _trials(4, n=1)[0]
    t.trial_end = np.ones(t.length, np.bool_)            # whatever the sender held
    (out,) = decode_trials(encode_trials([t]), SCHEMA)
    assert out.trial_end.dtype == np.bool_ and out.trial_end.shape == (t.length,)
    assert out.trial_end[-1] and not out.trial_end[:-1].any()


def test_encode_converts_dtypes_and_numpy_scalars():
    t = _trials(3, n=2)[1]
    t.obs = t.obs.astype(np.float64)
    t.actions = t.actions.astype(np.int32)
    t.gt = t.gt.astype(np.uint8)
    t.rewards = t.rewards.astype(np.float16)
    t.init_state = t.init_state.astype(np.float64)
    t.burnin_obs = t.burnin_obs.astype(np.float64)
    t.burnin_state = list(t.burnin_state.astype(np.float64))
    t.ground_truth = np.int64(2)
    t.episode_id = np.uint32(7)
    t.correct = np.bool_(True)
    (out,) = decode_trials(encode_trials([t]), SCHEMA)
    assert out.obs.dtype == np.float32 and out.actions.dtype == np.int64
    assert out.gt.dtype == np.int64 and out.rewards.dtype == np.float32
    np.testing.assert_array_equal(out.obs, t.obs.astype(np.float32))
    np.testing.assert_array_equal(out.gt, t.gt)
    np.testing.assert_array_equal(out.burnin_state, np.float32(t.burnin_state))
    assert out.ground_truth == 2 and out.correct is True and out.episode_id == 7
    assert type(out.ground_truth) is int and type(out.episode_id) is int
    # a generator works like a list
    assert len(decode_trials(encode_trials(x for x in _trials(3, n=3)), SCHEMA)) == 3


def test_encode_refuses_trials_that_cannot_share_a_column():
    trials = _trials(5, n=3)
    trials[1].obs = np.zeros((trials[1].length, OBS + 1), np.float32)
    with pytest.raises(ValueError, match="obs"):
        encode_trials(trials)
    trials = _trials(5, n=3)
    trials[2].init_state = np.zeros(STATE + 1, np.float32)
    with pytest.raises(ValueError, match="init_state"):
        encode_trials(trials)
    # a row moved from one trial to the next keeps the column sums: refused by the sender,
    # since no receiver could tell
    trials = _trials(5, n=3)
    trials[1].obs = np.concatenate([trials[1].obs, trials[2].obs[:1]])
    trials[2].obs = trials[2].obs[1:]
    with pytest.raises(ValueError, match=r"trials\[1\]\.obs has"):
        encode_trials(trials)
    for name in ("rewards", "gt"):
        trials = _trials(5, n=3)
        setattr(trials[2], name, getattr(trials[2], name)[:-1])
        with pytest.raises(ValueError, match=rf"trials\[2\]\.{name} has"):
            encode_trials(trials)


def test_extreme_int64_metadata_round_trips():
    t = _trials(6, n=1)[0]
    t.episode_id, t.weights_version, t.ground_truth = 2 ** 63 - 1, -(2 ** 63), -5
    (out,) = decode_trials(encode_trials([t]), SCHEMA)
    assert (out.episode_id, out.weights_version, out.ground_truth) == (2 ** 63 - 1, -(2 ** 63),
                                                                       -5)


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


def test_params_format_is_unchanged():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    m = msgpack.unpackb(encode_params({"w": w}, 5), raw=False)
    assert m == {"schema": "mpn-dqn/params", "v": 1, "version": 5,
                 "params": {"w": {"dtype": "<f4", "shape": [2, 3], "data": w.tobytes()}}}


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
        (lambda m: m.update(v=2), "message.v"),
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
    _rejects(encode_params({"w": np.ones(3, np.float32)}, 1), "schema")   # nor the reverse


# ----------------------------------------------------------------------------- corruption

def test_wrong_dtype():
    for name, dtype in (("obs", "<f8"), ("actions", "<i4"), ("lengths", "<i4"),
                        ("correct", "<b1"), ("fix_breaks", "<f8"), ("burnin_has_state", "|u1"),
                        ("init_state", ">f4"), ("burnin_lengths", "<u8")):
        m = _msg()
        m[name]["dtype"] = dtype
        assert f"message.{name}" in _rejects(m, "dtype"), name
    m = _msg()
    m["obs"]["dtype"] = b"<f4"
    _rejects(m, r"message\.obs.*dtype")


def test_shape_mismatch():
    m = _msg()
    rows = _col(m, "obs").shape[0]
    _put(m, "obs", np.zeros((rows, OBS + 1)))
    _rejects(m, r"message\.obs.*does not match the expected \[\d+, 3\]")
    m = _msg()
    _put(m, "obs", np.zeros(rows * OBS))
    _rejects(m, r"message\.obs.*must be 2-D")
    m = _msg()
    _put(m, "rewards", np.zeros(rows + 1))
    _rejects(m, r"message\.rewards.*does not match")
    m = _msg()
    _put(m, "gt", np.zeros(rows - 1))
    _rejects(m, r"message\.gt.*does not match")
    m = _msg()
    _put(m, "init_state", np.zeros((4, STATE - 1)))
    _rejects(m, r"message\.init_state.*does not match")
    m = _msg()
    _put(m, "init_state", np.zeros((5, STATE)))            # one row too many
    _rejects(m, r"message\.init_state.*does not match")
    for name in (*INT_FIELDS, "correct", "burnin_lengths", "burnin_has_state"):
        m = _msg()
        _put(m, name, np.zeros(5))                           # 4 trials
        _rejects(m, rf"message\.{name}.*does not match the expected \[4\]")
    m = _msg()
    _put(m, "burnin_obs", np.zeros((3, OBS, 1)))
    _rejects(m, r"burnin_obs.*2-D")
    m = _msg()
    b_obs = _col(m, "burnin_obs")
    _put(m, "burnin_obs", b_obs[:-1])                        # one burn-in row short
    _rejects(m, r"message\.burnin_obs.*does not match.*burn-in lengths sum to")
    m = _msg()
    _put(m, "burnin_obs", np.zeros((len(b_obs), OBS + 2)))
    _rejects(m, r"message\.burnin_obs.*does not match")
    m = _msg()
    _put(m, "burnin_state", np.zeros((3, STATE)))            # 2 flags set
    _rejects(m, r"message\.burnin_state.*does not match the expected \[2, 8\]")


def test_empty_columns_may_be_declared_0_by_0_only_when_empty():
    m = _msg(_trials(n=1))                                    # no burn-in, no burn-in state
    for name in ("burnin_obs", "burnin_state"):
        m[name] = _arr(np.zeros((0, 0), np.float32))
    assert len(decode_trials(_pack(m), SCHEMA)) == 1
    for name in ("burnin_obs", "burnin_state"):
        m = _msg(_trials(n=1))
        m[name] = _arr(np.zeros((0, 5), np.float32))          # a wrong width, even empty
        _rejects(m, rf"message\.{name}.*does not match")
    for name in ("obs", "init_state", "burnin_obs", "burnin_state"):
        m = _msg()                                            # these have rows
        m[name] = _arr(np.zeros((0, 0), np.float32))
        _rejects(m, rf"message\.{name}.*does not match")
    m = msgpack.unpackb(encode_trials([]), raw=False)
    assert m["obs"]["shape"] == [0, 0] and m["lengths"]["shape"] == [0]
    for name, shape in (("obs", (0, OBS)), ("init_state", (0, STATE))):
        m[name] = _arr(np.zeros(shape, np.float32))           # the schema's width: fine too
    assert decode_trials(_pack(m), SCHEMA) == []
    m[name] = _arr(np.zeros((0, STATE + 1), np.float32))
    _rejects(m, r"message\.init_state.*does not match")


def test_burnin_without_state_and_burnin_length_limits():
    m = _msg()
    has = _col(m, "burnin_has_state")
    has[3] = False                                           # trial 3 has a burn-in
    _put(m, "burnin_has_state", has)
    _put(m, "burnin_state", _col(m, "burnin_state")[:1])
    _rejects(m, r"trials\[3\]\.burnin_state.*needs a state")
    m = _msg()
    bl = _col(m, "burnin_lengths")
    bl[2] = SCHEMA.max_burnin + 1
    _put(m, "burnin_lengths", bl)
    _rejects(m, r"trials\[2\]\.burnin_obs.*exceeds the limit 20")
    m = _msg()
    bl = _col(m, "burnin_lengths")
    bl[1], bl[3] = -1, bl[3] + bl[1] + 1                     # same sum, one negative
    _put(m, "burnin_lengths", bl)
    _rejects(m, r"trials\[1\]\.burnin_obs.*negative")
    too_long = make_trial(np.random.default_rng(0), 3, OBS, STATE, ACTIONS, burnin=21)
    _rejects(encode_trials([too_long]), r"trials\[0\]\.burnin_obs.*exceeds")


def test_lengths_that_do_not_sum_to_the_step_rows():
    for delta in (1, -1):
        m = _msg()
        lengths = _col(m, "lengths")
        lengths[0] += delta
        _put(m, "lengths", lengths)
        rows = int(lengths.sum()) - delta
        _rejects(m, rf"message\.lengths.*sum to {rows + delta} but the step columns have "
                    rf"{rows} rows")
    m = _msg()
    lengths = _col(m, "lengths")
    lengths[-1] = 2 ** 40                                      # sums far past the data
    _put(m, "lengths", lengths)
    _rejects(m, r"trials\[3\]\.length.*outside")
    big = TrialSchema(OBS, STATE, ACTIONS, max_trial_len=2 ** 62)
    _rejects(m, r"message\.lengths.*sum to", schema=big)
    m = _msg()
    lengths = _col(m, "lengths")
    _put(m, "lengths", lengths[:-1])                          # a trial's length is missing
    _rejects(m, r"does not match the expected \[3\]")


def test_a_zero_negative_or_too_long_length():
    m = _msg()
    lengths = _col(m, "lengths")
    lengths[1] += lengths[2]
    lengths[2] = 0                                            # the sum still matches
    _put(m, "lengths", lengths)
    _rejects(m, r"trials\[2\]\.length: trial length 0 is outside \[1, 500\]")
    m = _msg()
    lengths = _col(m, "lengths")
    lengths[0], lengths[1] = -1, lengths[1] + lengths[0] + 1
    _put(m, "lengths", lengths)
    _rejects(m, r"trials\[0\]\.length: trial length -1 is outside")
    long = make_trial(np.random.default_rng(0), 501, OBS, STATE, ACTIONS)
    _rejects(encode_trials([_trials()[0], long]), r"trials\[1\]\.length.*outside \[1, 500\]")


def test_declared_shape_larger_than_data():
    m = _msg()
    m["obs"]["shape"][0] = 2 ** 40                     # huge declared size, tiny data
    _rejects(m, r"message\.obs.*needs \d+ bytes of data")
    m = _msg()
    m["lengths"]["shape"] = [2 ** 40]
    _rejects(m, r"message\.lengths.*needs")
    m = _msg()
    m["init_state"]["data"] = m["init_state"]["data"][:-4]
    _rejects(m, r"init_state.*needs 128 bytes of data, got 124")
    m = _msg()
    m["obs"]["shape"] = [2 ** 62, 2 ** 62]             # product overflows int64
    _rejects(m, r"message\.obs")
    m = _msg(_trials(n=1))                             # no burn-in: empty state column
    m["burnin_state"]["shape"] = [2 ** 63 - 1, 0]      # no data needed, absurd row count
    _rejects(m, r"message\.burnin_state.*does not match")
    m = _msg()
    m["obs"]["shape"] = [-1, OBS]
    _rejects(m, r"obs.*invalid dimension")
    m = _msg()
    m["obs"]["shape"] = [2 ** 64 - 1, OBS]
    _rejects(m, r"obs.*invalid dimension")


def test_non_finite_values():
    # trials 1 and 3 have a burn-in and a burn-in state; trial 0 and 2 have neither
    for trial in (1, 3):
        for field, bad in (("obs", np.nan), ("rewards", np.inf), ("init_state", -np.inf),
                           ("burnin_obs", np.nan), ("burnin_state", np.nan)):
            m = _msg()
            a = _col(m, field)
            if field in ("obs", "rewards"):
                row = _steps(m, trial)[1] - 1                  # the trial's last step
            elif field == "init_state":
                row = trial
            elif field == "burnin_obs":
                bl = _col(m, "burnin_lengths")
                row = int(bl[:trial + 1].sum()) - 1
            else:
                row = int(_col(m, "burnin_has_state")[:trial].sum())
            a[row] = bad
            _put(m, field, a)
            assert f"trials[{trial}].{field}" in _rejects(m, "NaN or infinity"), (trial, field)


def test_finite_but_huge_values_are_accepted():
    t = _trials(7, n=2)
    t[0].obs[:] = 3e38                                  # squares overflow float32
    t[1].init_state[:] = -3e38
    out = decode_trials(encode_trials(t), SCHEMA)
    assert (out[0].obs == np.float32(3e38)).all() and (out[1].init_state < -1e38).all()


def test_action_and_gt_out_of_range():
    for field, trial, bad in (("actions", 2, ACTIONS), ("actions", 0, -1), ("gt", 3, ACTIONS + 5),
                              ("gt", 1, -(2 ** 63))):
        m = _msg()
        a = _col(m, field)
        start, end = _steps(m, trial)
        a[end - 1] = bad
        _put(m, field, a)
        msg = _rejects(m, "outside")
        assert f"trials[{trial}].{field}" in msg and str(bad) in msg, msg
        assert f"step {end - 1 - start} of {end - start}" in msg, msg


def test_unknown_missing_and_duplicate_keys():
    m = _msg()
    m["extra"] = 1
    _rejects(m, r"message: unknown keys \['extra'\]")
    m = _msg()
    del m["rewards"]
    _rejects(m, r"message: missing keys \['rewards'\]")
    m = _msg()
    m["trial_end"] = _arr(np.ones(3, np.bool_))        # not part of version 2
    _rejects(m, r"unknown keys \['trial_end'\]")
    m = _msg()
    m["obs"]["order"] = "C"
    _rejects(m, r"message\.obs.*unknown keys")
    m = _msg()
    del m["lengths"]["data"]
    _rejects(m, r"message\.lengths.*missing keys \['data'\]")
    # duplicate keys can only be made by hand: {"v": 2, "v": 2, ...}
    raw = b"\x83" + _pack("schema") + _pack("mpn-dqn/trials") + (_pack("v") + _pack(2)) * 2
    _rejects(raw, "duplicate map key")
    valid = encode_trials(_trials())
    dup = b"\xde\x00\x15" + valid[3:] + _pack("lengths") + _pack(_msg()["lengths"])
    assert valid[:3] == b"\xde\x00\x14"                # a map16 of 20 entries
    _rejects(dup, "duplicate map key 'lengths'")
    _rejects(_pack({1: 2}), "payload")   # non-string key
    _rejects(_pack({b"schema": "mpn-dqn/trials"}), "payload")


def test_bool_columns_hold_only_0_and_1():
    for name in ("correct", "burnin_has_state"):
        m = _msg()
        data = bytearray(m[name]["data"])
        data[2] = 2
        m[name]["data"] = bytes(data)
        _rejects(m, rf"trials\[2\]\.{name}: expected a bool.*byte 2")


def test_scalar_fields():
    for trial, value in ((2, 10 ** 6), (0, -1)):
        m = _msg()
        fb = _col(m, "fix_breaks")
        fb[trial] = value
        _put(m, "fix_breaks", fb)
        T = _col(m, "lengths")[trial]
        _rejects(m, rf"trials\[{trial}\]\.fix_breaks: {value} is outside \[0, T={T}\]")
    m = _msg()
    fb = _col(m, "fix_breaks")
    fb[1] = _col(m, "lengths")[1]                      # every step broke fixation: allowed
    _put(m, "fix_breaks", fb)
    assert decode_trials(_pack(m), SCHEMA)[1].fix_breaks == fb[1]
    for name, value, match in (("episode_id", 5, "array map"), ("correct", True, "array map"),
                               ("obs", [1.0, 2.0], "array map"), ("actor_id", None, "array map")):
        m = _msg()
        m[name] = value
        _rejects(m, rf"message\.{name}.*{match}")
    m = _msg()
    m["obs"]["data"] = "text"
    _rejects(m, r"obs.*binary")
    m = _msg()
    m["lengths"]["shape"] = "4"
    _rejects(m, r"lengths.*shape must be a list")
    m = _msg()
    m["lengths"]["shape"] = [True]
    _rejects(m, r"lengths.*invalid dimension")
    m = _msg()
    m["lengths"]["shape"] = [4.0]
    _rejects(m, r"lengths.*invalid dimension")


def test_oversize_message():
    payload = encode_trials(_trials())
    small = TrialSchema(OBS, STATE, ACTIONS, max_message_bytes=len(payload) - 1)
    _rejects(payload, "exceeds the limit", schema=small)
    few = TrialSchema(OBS, STATE, ACTIONS, max_trials=3)
    _rejects(payload, r"message\.lengths: 4 trials exceed the limit 3", schema=few)
    assert len(decode_trials(payload, TrialSchema(OBS, STATE, ACTIONS, max_trials=4))) == 4
    with pytest.raises(TrialDecodeError):
        decode_trials(b"\x00" * (SCHEMA.max_message_bytes + 1), SCHEMA)


def test_schema_mismatch_between_sender_and_receiver():
    payload = encode_trials(_trials())
    _rejects(payload, r"message\.obs.*obs_dim 4", schema=TrialSchema(4, STATE, ACTIONS))
    _rejects(payload, r"message\.init_state.*state_size 9", schema=TrialSchema(OBS, 9, ACTIONS))
    _rejects(payload, r"actions|gt", schema=TrialSchema(OBS, STATE, 1))


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
    m["v"] = 3
    _rejects(m, r"message\.v.*version 3.*newer mpn-dqn")
    for v in (True, 2.0, "2", 0, -1, None):
        m = _msg()
        m["v"] = v
        _rejects(m, r"message\.v: unsupported format version")
    m = _msg()
    del m["v"]
    _rejects(m, r"missing keys \['v'\]")
    m = _msg()
    m["lengths"] = {"0": 1}
    _rejects(m, r"message\.lengths")


def test_a_version_1_message_is_rejected_with_the_version_message():
    trials = _trials(8, n=3)
    msg = _rejects(_v1_message(trials), r"message\.v")
    assert "older mpn-dqn" in msg and "same mpn-dqn version" in msg and "version 2" in msg
    # an empty v1 batch and a large one get the same answer, not a structural complaint
    assert "older mpn-dqn" in _rejects(_v1_message([]))
    assert "older mpn-dqn" in _rejects(_v1_message(_trials(9, n=60)))
    # and a version 2 message with the same trials is accepted
    assert len(decode_trials(encode_trials(trials), SCHEMA)) == 3


# ----------------------------------------------------------------------------- fuzzing

_FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_leaves = (st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1)
           | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=64)
           | st.sampled_from(["schema", "v", "lengths", "obs", "dtype", "shape", "data", "<f4",
                              "<i8", "|b1", "mpn-dqn/trials", 1, 0, 2, 3]))
_structures = st.recursive(
    _leaves, lambda kids: st.lists(kids, max_size=5)
    | st.dictionaries(st.text(max_size=10) | st.sampled_from(["schema", "v", "lengths", "obs",
                                                              "dtype", "shape", "data"]),
                      kids, max_size=5), max_leaves=30)


def _check_accepted(out: list) -> None:
    """What an accepted message must satisfy, whatever it was."""
    for t in out:
        assert isinstance(t, Trial) and 1 <= t.length <= SCHEMA.max_trial_len
        assert t.obs.shape == (t.length, OBS) and t.init_state.shape == (STATE,)
        assert ((0 <= t.actions) & (t.actions < ACTIONS)).all()
        assert ((0 <= t.gt) & (t.gt < ACTIONS)).all()
        for name in ("obs", "rewards", "init_state", "burnin_obs", "burnin_state"):
            assert np.isfinite(getattr(t, name)).all()
        assert t.burnin_obs.shape[1] == OBS and t.burnin_obs.shape[0] <= SCHEMA.max_burnin
        assert t.burnin_state.shape in ((STATE,), (0,))
        assert t.burnin_obs.shape[0] == 0 or t.burnin_state.shape == (STATE,)
        assert 0 <= t.fix_breaks <= t.length and t.trial_end[-1] and t.trial_end.sum() == 1


def _decode_or_reject(payload: bytes) -> None:
    assert_only_decode_errors(payload, SCHEMA)
    try:
        out = decode_trials(payload, SCHEMA)
    except TrialDecodeError:
        return
    _check_accepted(out)


@_FUZZ
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(data):
    assert_only_decode_errors(data, SCHEMA)
    try:
        decode_params(data)
    except TrialDecodeError:
        pass


_VALID = encode_trials(_trials(7, n=3))
_VALID_OBJ = msgpack.unpackb(_VALID, raw=False)


@_FUZZ
@given(_structures, st.sampled_from(COLUMNS))
def test_fuzz_arbitrary_msgpack(obj, column):
    assert_only_decode_errors(_pack(obj), SCHEMA)
    m = copy.deepcopy(_VALID_OBJ)
    m[column] = obj
    assert_only_decode_errors(_pack(m), SCHEMA)


_ALL_PATHS = [p for p in msgpack_paths(_VALID_OBJ) if p]


@_FUZZ
@given(st.sampled_from(_ALL_PATHS), _structures)
def test_fuzz_mutated_valid_message(path, value):
    m = copy.deepcopy(_VALID_OBJ)
    target = m
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    _decode_or_reject(_pack(m))


@_FUZZ
@given(st.sampled_from(COLUMNS), st.data())
def test_fuzz_column_values(column, data):
    """Random values of the right dtype and size in one column: reaches the value checks
    (lengths, ranges, finiteness, flags) rather than the structural ones."""
    m = copy.deepcopy(_VALID_OBJ)
    n = len(m[column]["data"])
    if n:
        m[column]["data"] = data.draw(st.binary(min_size=n, max_size=n))
    _decode_or_reject(_pack(m))


@_FUZZ
@given(st.integers(0, len(_VALID) - 1), st.integers(0, 255))
def test_fuzz_flipped_byte(pos, byte):
    data = bytearray(_VALID)
    data[pos] = byte
    _decode_or_reject(bytes(data))


@_FUZZ
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 5), st.booleans()), max_size=8),
       st.integers(0, 2 ** 32))
def test_fuzz_round_trip_random_batches(shapes, seed):
    rng = np.random.default_rng(seed)
    trials = []
    for length, burnin, state in shapes:
        t = make_trial(rng, length, OBS, STATE, ACTIONS, burnin=burnin)
        if not burnin and state:
            t.burnin_state = rng.standard_normal(STATE).astype(np.float32)
        trials.append(t)
    out = decode_trials(encode_trials(trials), SCHEMA)
    assert len(out) == len(trials)
    _check_accepted(out)
    for a, b in zip(trials, out):
        assert_trials_equal(a, b)
        assert b.burnin_state.shape == a.burnin_state.shape
        np.testing.assert_array_equal(b.burnin_state, a.burnin_state)
