"""More decoder fuzzing (see also tests/test_codec.py): truncations, huge declared sizes, and a
short run of the hand-run fuzzer ``tests/benchmarks/fuzz_codec.py`` so it cannot rot."""
import tracemalloc

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpn_dqn.common.codec import TrialDecodeError, TrialSchema, decode_trials, encode_trials
from tests.benchmarks import fuzz_codec
from tests.helpers import assert_only_decode_errors, make_trial

SCHEMA = TrialSchema(obs_dim=3, state_size=8, num_actions=3, max_burnin=10)
_FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_VALID = encode_trials([make_trial(np.random.default_rng(3), n, burnin=b)
                        for n, b in ((5, 0), (17, 4), (1, 10))])


@_FUZZ
@given(st.integers(0, len(_VALID) - 1))
def test_fuzz_every_truncation_is_rejected(cut):
    try:
        decode_trials(_VALID[:cut], SCHEMA)
    except TrialDecodeError:
        return
    raise AssertionError(f"a message cut at {cut} of {len(_VALID)} bytes was accepted")


_HEADERS = st.sampled_from([b"\xc6\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff",
                            b"\xdf\xff\xff\xff\xff", b"\xc5\xff\xff", b"\xdc\xff\xff", b"\xde\xff\xff"])


@_FUZZ
@given(st.integers(0, len(_VALID)), _HEADERS, st.booleans())
def test_fuzz_huge_declared_container_sizes(pos, header, overwrite):
    data = _VALID[:pos] + header + _VALID[pos + (len(header) if overwrite else 0):]
    assert_only_decode_errors(data, SCHEMA)


_COLUMNS = ["lengths", "obs", "actions", "rewards", "gt", "init_state", "ground_truth",
            "fix_breaks", "episode_id", "actor_id", "env_id", "trial_index", "weights_version",
            "correct", "burnin_lengths", "burnin_obs", "burnin_has_state", "burnin_state"]


@_FUZZ
@given(st.sampled_from(_COLUMNS), st.lists(st.integers(0, 2 ** 63 - 1), min_size=0, max_size=4))
def test_fuzz_huge_declared_shapes(column, shape):
    obj = msgpack.unpackb(_VALID, raw=False)
    assert set(_COLUMNS) | {"schema", "v"} == set(obj)
    obj[column]["shape"] = shape
    assert_only_decode_errors(msgpack.packb(obj, use_bin_type=True), SCHEMA)


@_FUZZ
@given(st.sampled_from(["lengths", "burnin_lengths", "fix_breaks"]), st.integers(0, 2),
       st.integers(-2 ** 63, 2 ** 63 - 1))
def test_fuzz_huge_declared_lengths(column, which, value):
    """A length (or fix_breaks) claiming far more rows than were sent is refused before any
    array is sized by it."""
    obj = msgpack.unpackb(_VALID, raw=False)
    col = np.frombuffer(obj[column]["data"], "<i8").copy()
    before = int(col[which])
    col[which] = value
    obj[column]["data"] = col.tobytes()
    payload = msgpack.packb(obj, use_bin_type=True)
    tracemalloc.start()
    try:
        out = decode_trials(payload, SCHEMA)
    except TrialDecodeError:
        assert value != before
        return
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 64 * (len(payload) + 1024), peak
    # accepted: the value was unchanged, or a fix_breaks within its trial
    assert len(out) == 3
    assert value == before or (column == "fix_breaks" and 0 <= value <= out[which].length)


def test_the_fuzz_benchmark_finds_nothing_in_a_short_run():
    res = fuzz_codec.run(1000, seed=1, max_ms=100.0, max_ratio=64.0, params_every=10)
    assert res["failures"] == []
    assert res["total"]["crash"] == 0
    assert res["total"]["accepted"] > 0 and res["total"]["rejected"] > 700
