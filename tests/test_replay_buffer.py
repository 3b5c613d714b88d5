"""Tests for replay/buffer.py: FIFO eviction, padded sampling, memory, snapshots."""
from __future__ import annotations

import io

import numpy as np
import pytest

from mpn_dqn.common.trial import Trial
from mpn_dqn.replay import TrialBatch, TrialBuffer
from tests.helpers import assert_trials_equal, make_trial

OBS, STATE = 3, 8


def _fill(buf: TrialBuffer, n: int, seed: int = 0, lengths=(5, 30), burnin=0,
          obs_dim=OBS, state_size=STATE) -> list[Trial]:
    rng = np.random.default_rng(seed)
    trials = []
    for k in range(n):
        b = burnin if isinstance(burnin, int) else int(rng.integers(*burnin))
        t = make_trial(rng, int(rng.integers(lengths[0], lengths[1] + 1)), obs_dim, state_size,
                       burnin=b)
        t.trial_index = k            # insertion number, to check FIFO order
        trials.append(t)
    assert buf.add_many(trials) == n
    return trials


def _check_batch_against_trials(buf: TrialBuffer, batch: TrialBatch, pad: int = 1) -> None:
    B = batch.slots.shape[0]
    T = batch.obs.shape[1]
    assert T % pad == 0 and T - pad < batch.lengths.max() <= T
    for b in range(B):
        t = buf.get_trial(int(batch.slots[b]))
        L = t.length
        assert batch.lengths[b] == L
        np.testing.assert_array_equal(batch.mask[b], np.arange(T) < L)
        np.testing.assert_array_equal(batch.obs[b, :L], t.obs)
        np.testing.assert_array_equal(batch.actions[b, :L], t.actions)
        np.testing.assert_array_equal(batch.rewards[b, :L], t.rewards)
        np.testing.assert_array_equal(batch.gt[b, :L], t.gt)
        assert not batch.obs[b, L:].any() and not batch.actions[b, L:].any()
        assert not batch.rewards[b, L:].any() and not batch.gt[b, L:].any()
        np.testing.assert_array_equal(batch.init_state[b], t.init_state)
        assert batch.correct[b] == t.correct
        assert batch.weights_version[b] == t.weights_version
        N = batch.burnin_obs.shape[1]
        n = t.burnin_obs.shape[0]
        np.testing.assert_array_equal(batch.burnin_mask[b], np.arange(N) >= N - n)
        np.testing.assert_array_equal(batch.burnin_obs[b, N - n:], t.burnin_obs)
        assert not batch.burnin_obs[b, : N - n].any()
        if n:
            np.testing.assert_array_equal(batch.burnin_state[b], t.burnin_state)
        else:
            assert not batch.burnin_state[b].any()


# ----------------------------------------------------------------------------- construction

@pytest.mark.parametrize("kwargs, match", [
    (dict(capacity=0, obs_dim=3, state_size=8), "capacity"),
    (dict(capacity=2.5, obs_dim=3, state_size=8), "capacity"),
    (dict(capacity=True, obs_dim=3, state_size=8), "capacity"),
    (dict(capacity=10, obs_dim=0, state_size=8), "obs_dim"),
    (dict(capacity=10, obs_dim=3, state_size=-1), "state_size"),
    (dict(capacity=10, obs_dim=3, state_size=8, max_burnin=-1), "max_burnin"),
    (dict(capacity=10, obs_dim=3, state_size=8, seed=-1), "seed"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrialBuffer(**kwargs)


def test_empty_buffer_and_bad_sample_args():
    buf = TrialBuffer(4, OBS, STATE)
    assert len(buf) == 0 and buf.num_steps == 0 and buf.payload_nbytes() == 0
    with pytest.raises(ValueError, match="empty"):
        buf.sample(2)
    _fill(buf, 1)
    with pytest.raises(ValueError, match="batch_size"):
        buf.sample(0)
    with pytest.raises(ValueError, match="pad_multiple"):
        buf.sample(2, pad_multiple=0)


def test_add_rejects_mismatched_trials():
    rng = np.random.default_rng(0)
    buf = TrialBuffer(4, OBS, STATE, max_burnin=3)
    with pytest.raises(ValueError, match="obs"):
        buf.add(make_trial(rng, 5, OBS + 1, STATE))
    with pytest.raises(ValueError, match="init_state"):
        buf.add(make_trial(rng, 5, OBS, STATE + 1))
    with pytest.raises(ValueError, match="max_burnin"):
        buf.add(make_trial(rng, 5, OBS, STATE, burnin=4))
    t = make_trial(rng, 5, OBS, STATE)
    t.trial_end[0] = True
    with pytest.raises(ValueError, match="trial_end"):
        buf.add(t)
    assert len(buf) == 0 and buf.num_steps == 0


# ----------------------------------------------------------------------------- FIFO

def test_fifo_eviction_order_and_counters():
    rng = np.random.default_rng(1)
    trials = [make_trial(rng, int(rng.integers(1, 30)), OBS, STATE) for _ in range(12)]
    for k, t in enumerate(trials):
        t.trial_index = k
    buf = TrialBuffer(5, OBS, STATE, seed=1)
    buf.add_many(trials[:3])
    assert len(buf) == 3 and buf.inserted == 3 and buf.evicted == 0
    seen_evicted = []
    for k in range(3, 12):
        oldest = buf.get_trial(k % 5).trial_index if len(buf) == 5 else None
        buf.add(trials[k])
        if oldest is not None:
            seen_evicted.append(oldest)
        # the oldest trial went, the newest is in slot k % capacity
        assert_trials_equal(buf.get_trial(k % 5), trials[k])
    assert seen_evicted == list(range(7))
    assert len(buf) == 5 and buf.inserted == 12 and buf.evicted == 7
    kept = trials[-5:]
    assert sorted(buf.get_trial(s).trial_index for s in range(5)) == list(range(7, 12))
    for k in range(7, 12):
        assert_trials_equal(buf.get_trial(k % 5), trials[k])
    assert buf.num_steps == sum(t.length for t in kept)
    assert buf.payload_nbytes() == sum(t.payload_nbytes() for t in kept)
    assert {int(s) for s in buf.sample(200).slots} == set(range(5))


def test_contents_exact_across_growth_and_wraparound():
    # tiny initial ring: many reallocations and wrap-arounds while trials are replaced
    buf = TrialBuffer(7, OBS, STATE, max_burnin=4, seed=3)
    rng = np.random.default_rng(3)
    trials = []
    for k in range(200):
        hi = 20 if k < 100 else 120      # lengths jump: forces growth after the ring is full
        t = make_trial(rng, int(rng.integers(1, hi)), OBS, STATE, burnin=int(rng.integers(0, 5)))
        buf.add(t)
        trials.append(t)
        live = trials[-7:]
        if k % 17 == 0 or k == 199:
            for j, tt in enumerate(trials[max(0, k - 6):k + 1], start=max(0, k - 6)):
                assert_trials_equal(buf.get_trial(j % 7), tt)
            assert buf.num_steps == sum(t.length for t in live)
            _check_batch_against_trials(buf, buf.sample(16))


# ----------------------------------------------------------------------------- sampling

def test_sample_shapes_dtypes_padding_and_burnin_alignment():
    buf = TrialBuffer(50, OBS, STATE, max_burnin=6, seed=0)
    _fill(buf, 50, lengths=(3, 17), burnin=(0, 7))
    for pad in (1, 8):
        batch = buf.sample(32, pad_multiple=pad)
        B, T = batch.mask.shape
        N = batch.burnin_obs.shape[1]
        assert B == 32 and T % pad == 0 and N <= 6
        expect = dict(obs=((B, T, OBS), np.float32), actions=((B, T), np.int64),
                      rewards=((B, T), np.float32), mask=((B, T), np.bool_),
                      lengths=((B,), np.int64), init_state=((B, STATE), np.float32),
                      burnin_obs=((B, N, OBS), np.float32), burnin_mask=((B, N), np.bool_),
                      burnin_state=((B, STATE), np.float32), correct=((B,), np.bool_),
                      weights_version=((B,), np.int64), slots=((B,), np.int64),
                      gt=((B, T), np.int64))
        for name, (shape, dtype) in expect.items():
            arr = getattr(batch, name)
            assert arr.shape == shape and arr.dtype == dtype, name
        _check_batch_against_trials(buf, batch, pad)
    # batches are copies: writing into one does not touch the buffer
    before = buf.get_trial(int(batch.slots[0]))
    batch.obs[...] = 99
    batch.init_state[...] = 99
    batch.burnin_obs[...] = 99
    assert_trials_equal(buf.get_trial(int(batch.slots[0])), before)


def test_sample_without_burnin_storage():
    buf = TrialBuffer(10, OBS, STATE, max_burnin=0)
    _fill(buf, 10, burnin=3)              # burn-in is ignored by a max_burnin=0 buffer
    batch = buf.sample(4)
    assert batch.burnin_obs.shape == (4, 0, OBS) and batch.burnin_mask.shape == (4, 0)
    assert batch.burnin_state.shape == (4, 0)
    assert buf.get_trial(0).burnin_obs.shape == (0, OBS)
    assert buf.payload_nbytes() == sum(buf.get_trial(s).payload_nbytes() for s in range(10))


def test_sample_uniform_and_rng():
    buf = TrialBuffer(20, OBS, STATE)
    _fill(buf, 35)
    counts = np.bincount(buf.sample(4000).slots, minlength=20)
    assert counts.min() > 0 and counts.sum() == 4000
    assert counts.min() > 140 and counts.max() < 270     # expected 200 each (sd ~14)
    a = buf.sample(8, rng=np.random.default_rng(5)).slots
    b = buf.sample(8, rng=np.random.default_rng(5)).slots
    np.testing.assert_array_equal(a, b)
    part = TrialBuffer(20, OBS, STATE)
    _fill(part, 6)
    assert set(part.sample(500).slots.tolist()) == set(range(6))   # only filled slots


# ----------------------------------------------------------------------------- memory

@pytest.mark.parametrize("lengths, burnin", [((145, 465), 0), ((14, 40), 0), ((14, 40), 10),
                                             ((145, 465), 10)])
def test_memory_within_1_5x_payload(lengths, burnin):
    cap, O, S = 200, 5, 6 * 128
    buf = TrialBuffer(cap, O, S, max_burnin=burnin)
    rng = np.random.default_rng(0)
    worst = 0.0
    for k in range(3 * cap):
        buf.add(make_trial(rng, int(rng.integers(lengths[0], lengths[1] + 1)), O, S,
                           burnin=burnin))
        if len(buf) == cap:
            worst = max(worst, buf.nbytes() / buf.payload_nbytes())
    assert 1.0 <= worst <= 1.5, worst


# ----------------------------------------------------------------------------- snapshots

def test_state_dict_round_trip():
    buf = TrialBuffer(9, OBS, STATE, max_burnin=4, seed=11)
    trials = _fill(buf, 23, burnin=(0, 5))
    buf.sample(3)                                      # advance the rng
    d = buf.state_dict()
    for v in d.values():
        assert isinstance(v, (int, np.ndarray)) and getattr(v, "dtype", None) != object
    # through an .npz file without pickle
    f = io.BytesIO()
    np.savez(f, **d)
    f.seek(0)
    loaded = dict(np.load(f, allow_pickle=False))
    for restored in (TrialBuffer.from_state_dict(d), TrialBuffer.from_state_dict(loaded)):
        assert len(restored) == len(buf) and restored.num_steps == buf.num_steps
        assert restored.inserted == 23 and restored.evicted == 14
        assert restored.payload_nbytes() == buf.payload_nbytes()
        for slot in range(9):
            assert_trials_equal(restored.get_trial(slot), buf.get_trial(slot))
        b = restored.sample(5)
        c = TrialBuffer.from_state_dict(d).sample(5)
        np.testing.assert_array_equal(b.slots, c.slots)     # rng state restored
        # both keep evicting in the same order
        nxt = make_trial(np.random.default_rng(9), 12, OBS, STATE, burnin=2)
        restored.add(nxt)
        assert_trials_equal(restored.get_trial(23 % 9), nxt)
    with pytest.raises(ValueError, match="obs_dim"):
        TrialBuffer(9, OBS + 1, STATE, max_burnin=4).load_state_dict(d)
    bad = dict(d, offset=d["offset"][::-1].copy())
    other = TrialBuffer(9, OBS, STATE, max_burnin=4)
    with pytest.raises(ValueError, match="offsets"):
        other.load_state_dict(bad)
    assert len(other) == 0                           # unchanged after a failed load
    assert trials[-1].trial_index == 22


def test_burnin_arrays_allocated_only_when_needed():
    buf = TrialBuffer(30, OBS, STATE, max_burnin=5)
    _fill(buf, 30, burnin=0)
    empty_nbytes = buf.nbytes()
    batch = buf.sample(4)
    assert batch.burnin_obs.shape == (4, 0, OBS) and not batch.burnin_state.any()
    restored = TrialBuffer.from_state_dict(buf.state_dict())
    assert restored.nbytes() <= empty_nbytes
    t = make_trial(np.random.default_rng(1), 9, OBS, STATE, burnin=3)
    for b in (buf, restored):
        b.add(t)
        assert b.nbytes() > empty_nbytes
        assert_trials_equal(b.get_trial(0), t)
        _check_batch_against_trials(b, b.sample(64))
    again = TrialBuffer.from_state_dict(restored.state_dict())
    assert_trials_equal(again.get_trial(0), t)


def test_the_learner_batch_leaves_out_what_only_the_replay_reads_and_passes_the_check():
    from mpn_dqn.common.codec import TrialDecodeError
    from mpn_dqn.replay.wire import check_batch
    buf = TrialBuffer(50, obs_dim=3, state_size=8, max_burnin=4)
    _fill(buf, 20, burnin=4)
    full = buf.sample(6, rng=np.random.default_rng(0))
    lean = buf.sample(6, rng=np.random.default_rng(0), meta=False)
    for name in ("obs", "actions", "rewards", "mask", "lengths", "init_state", "burnin_obs",
                 "burnin_mask", "burnin_state", "slots"):
        np.testing.assert_array_equal(getattr(lean, name), getattr(full, name), err_msg=name)
    assert lean.correct is None and lean.weights_version is None and lean.gt is None
    assert check_batch(lean, 3, 8) is lean
    with pytest.raises(TrialDecodeError, match=r"batch\.init_state.*dimension S is 8 here but 9"):
        check_batch(lean, 3, 9)
    lean.actions = lean.actions.astype(np.int32)
    with pytest.raises(TrialDecodeError, match=r"batch\.actions: expected int64"):
        check_batch(lean, 3, 8)
    with pytest.raises(TrialDecodeError, match="expected a TrialBatch"):
        check_batch({"obs": lean.obs}, 3, 8)


def test_a_batch_without_burn_in_carries_no_burn_in_state():
    buf = TrialBuffer(50, obs_dim=3, state_size=8)
    _fill(buf, 20)
    b = buf.sample(6, meta=False)
    assert b.burnin_obs.shape == (6, 0, 3) and b.burnin_state.shape == (6, 0)
