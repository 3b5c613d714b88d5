"""Trial replay buffer: whole NeuroGym trials in preallocated numpy arrays, FIFO by trial.

Layout (no Python object per step or per trial):

* steps of all stored trials live in flat *ring* arrays ``obs [step_cap, O]``, ``actions``,
  ``rewards``, ``gt`` ``[step_cap]``; a trial occupies ``length`` consecutive ring positions
  starting at ``offset`` (modulo ``step_cap``, so a trial may wrap around the end).  Because
  trials are evicted oldest first, the live steps always form one contiguous arc of the ring,
  in insertion order.  ``trial_end`` is not stored (it is True exactly at the last step).
* per-trial data and metadata live in arrays of length ``capacity`` indexed by *slot*; trial
  number ``k`` (0-based, counting every trial ever added) goes to slot ``k % capacity``, so
  the live slots are always ``0 .. len(buffer)-1`` and the oldest is the one overwritten next.
* burn-in observations (at most ``max_burnin`` steps, usually ~10) are stored per slot in
  ``[capacity, max_burnin, O]``, right-aligned, with the burn-in state in ``[capacity, S]``;
  these two are allocated when the first trial with a burn-in arrives.  With
  ``max_burnin == 0`` they never are and a trial's burn-in is ignored.  (Each slot then
  reserves room for a burn-in state, so a buffer where most but not all trials lack a burn-in
  uses more memory per payload byte: about 1.35x payload at dt=100 if half the trials have
  none.)

The step ring starts small and grows (x1.25, compacting the live arc to the front) whenever
a new trial does not fit in the free part of the ring, so its size tracks the largest number
of live steps seen, within a factor 1.25; it never shrinks.  Not thread-safe: guard it with a
lock if actors' receiving threads and the learner share it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from mpn_dqn.common.trial import Trial

__all__ = ["TrialBatch", "TrialBuffer"]

_STATE_FORMAT = 1
_GROWTH = 1.25
_MIN_STEPS = 256


@dataclass
class TrialBatch:
    """A sampled batch; every array is a fresh copy (safe to modify or hand to torch).

    ``T`` = the longest trial in the batch rounded up to a multiple of ``pad_multiple``; trial
    steps are left-aligned (step t of trial b at ``[b, t]``, ``mask[b, t] = t < lengths[b]``),
    padding is zero.  ``N`` = the longest burn-in in the batch (0 if none); burn-in steps are
    right-aligned so that the burn-in ends exactly where the trial starts.  ``burnin_state``
    is zero where a trial has no burn-in, and ``[B, 0]`` when no trial in the batch has one.  ``gt`` (int64 [B, T], 0 on padding) is the per-step
    ground-truth action, an addition to the original interface.
    """

    obs: np.ndarray             # float32 [B, T, O]
    actions: np.ndarray         # int64   [B, T]
    rewards: np.ndarray         # float32 [B, T]
    mask: np.ndarray            # bool    [B, T]
    lengths: np.ndarray         # int64   [B]
    init_state: np.ndarray      # float32 [B, S]
    burnin_obs: np.ndarray      # float32 [B, N, O]
    burnin_mask: np.ndarray     # bool    [B, N]
    burnin_state: np.ndarray    # float32 [B, S], or [B, 0] when N == 0
    slots: np.ndarray | None = None            # int64 [B]
    # with sample(meta=True) only (the learner does not read them):
    correct: np.ndarray | None = None          # bool  [B]
    weights_version: np.ndarray | None = None  # int64 [B]
    gt: np.ndarray | None = None               # int64 [B, T]

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])


def _scalar(d: dict, key: str, hint: str = "") -> int:
    """``d[key]`` as an int (a loaded ``.npz`` holds it as a 0-d array)."""
    if key not in d:
        raise ValueError(f"state dict lacks {key!r}{hint}")
    return int(np.asarray(d[key]).item())


def _check_int(name: str, value, low: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int >= {low}, got {value!r} "
                         f"({type(value).__name__}); {hint}")
    value = int(value)
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}; {hint}")
    return value


# per-slot int64 metadata copied from / to Trial attributes of the same name
_META_FIELDS = ("ground_truth", "fix_breaks", "episode_id", "actor_id", "env_id", "trial_index",
                "weights_version")


class TrialBuffer:
    """FIFO replay of whole trials with uniform sampling (with replacement)."""

    def __init__(self, capacity: int, obs_dim: int, state_size: int, *, max_burnin: int = 0,
                 seed: int = 0) -> None:
        self.capacity = _check_int("capacity", capacity, 1,
                                   "pass the number of trials to keep (e.g. --buffer-size)")
        self.obs_dim = _check_int("obs_dim", obs_dim, 1,
                                  "pass the observation size of the task (env.observation_space)")
        self.state_size = _check_int("state_size", state_size, 1,
                                     "pass the flattened recurrent state size of the network")
        self.max_burnin = _check_int("max_burnin", max_burnin, 0,
                                     "pass the burn-in length (--burn-in-steps) or 0 for none")
        seed = _check_int("seed", seed, 0, "pass a non-negative int seed")
        self._rng = np.random.default_rng(seed)
        C, S, O, M = self.capacity, self.state_size, self.obs_dim, self.max_burnin

        # per-slot arrays
        self._offset = np.zeros(C, np.int64)
        self._length = np.zeros(C, np.int64)
        self._init_state = np.zeros((C, S), np.float32)
        self._correct = np.zeros(C, np.bool_)
        self._meta = {name: np.zeros(C, np.int64) for name in _META_FIELDS}
        self._burnin_len = np.zeros(C if M else 0, np.int64)
        # burn-in obs / state are allocated when the first trial with a burn-in arrives
        self._burnin_obs = np.zeros((0, M, O), np.float32)
        self._burnin_state = np.zeros((0, S), np.float32)

        # step ring
        self._alloc_steps(max(_MIN_STEPS, min(16 * C, 1 << 16)))
        self._head = 0      # next free ring position
        self._tail = 0      # ring position of the oldest live step
        self._used = 0      # live steps
        self._size = 0
        self._inserted = 0
        self._evicted = 0
        self._payload = 0

    # ------------------------------------------------------------------ bookkeeping
    def _alloc_steps(self, cap: int) -> None:
        # one extra row at index ``cap`` that stays zero: padded batch positions read it
        self._step_cap = cap
        self._obs = np.zeros((cap + 1, self.obs_dim), np.float32)
        self._actions = np.zeros(cap + 1, np.int64)
        self._rewards = np.zeros(cap + 1, np.float32)
        self._gt = np.zeros(cap + 1, np.int64)

    def _alloc_burnin(self) -> None:
        C, M = self.capacity, self.max_burnin
        self._burnin_obs = np.zeros((C, M, self.obs_dim), np.float32)
        self._burnin_state = np.zeros((C, self.state_size), np.float32)

    @property
    def _has_burnin_arrays(self) -> bool:
        return self._burnin_obs.shape[0] > 0

    def _step_arrays(self) -> tuple[np.ndarray, ...]:
        return self._obs, self._actions, self._rewards, self._gt

    def _trial_payload(self, length: int, burnin: int) -> int:
        """Trial.payload_nbytes() of a trial as stored (canonical dtypes)."""
        O, S = self.obs_dim, self.state_size
        per_step = 4 * O + 8 + 4 + 8 + 1          # obs, actions, rewards, gt, trial_end
        return length * per_step + 4 * S + burnin * 4 * O + (4 * S if burnin else 0)

    def _live_order(self) -> np.ndarray:
        """Live slots, oldest first."""
        first = self._inserted % self.capacity if self._size == self.capacity else 0
        return (first + np.arange(self._size)) % self.capacity

    def _compacted_steps(self) -> list[np.ndarray]:
        """Live steps in insertion order (copies); a slot's offset into them is
        ``(offset - tail) % step_cap``."""
        cap, t, u = self._step_cap, self._tail, self._used
        if t + u <= cap:
            return [a[t:t + u].copy() for a in self._step_arrays()]
        k = cap - t
        return [np.concatenate([a[t:cap], a[:u - k]]) for a in self._step_arrays()]

    def _grow(self, need: int) -> None:
        new_cap = max(need, int(self._step_cap * _GROWTH) + 1)
        steps = self._compacted_steps()
        # all slots (mid-add, the live ones are not simply 0..size-1; the others are unused)
        self._offset[:] = (self._offset - self._tail) % self._step_cap
        self._alloc_steps(new_cap)
        for dst, src in zip(self._step_arrays(), steps):
            dst[: self._used] = src
        self._tail = 0
        self._head = self._used

    def _evict(self, slot: int) -> None:
        length = int(self._length[slot])
        self._used -= length
        self._tail = (int(self._offset[slot]) + length) % self._step_cap
        self._payload -= self._trial_payload(length, int(self._burnin_len[slot])
                                             if self.max_burnin else 0)
        self._size -= 1
        self._evicted += 1
        if self._used == 0:
            self._head = self._tail = 0

    def _write_steps(self, start: int, arrays: tuple[np.ndarray, ...], length: int) -> None:
        end = start + length
        if end <= self._step_cap:
            for dst, src in zip(self._step_arrays(), arrays):
                dst[start:end] = src
        else:
            k = self._step_cap - start
            for dst, src in zip(self._step_arrays(), arrays):
                dst[start:self._step_cap] = src[:k]
                dst[: length - k] = src[k:]

    # ------------------------------------------------------------------ adding
    def add(self, trial: Trial) -> None:
        """Store one trial (copied; dtypes converted), evicting the oldest if full.

        Raises ValueError if the trial's shapes do not fit this buffer.  A trial's burn-in is
        ignored when ``max_burnin == 0`` and rejected when it is longer than ``max_burnin``.
        Values are not checked for NaN here (the network codec does that)."""
        O, S, M = self.obs_dim, self.state_size, self.max_burnin
        actions = np.asarray(trial.actions)
        if actions.ndim != 1 or actions.shape[0] < 1:
            raise ValueError(f"trial.actions must have shape [T] with T >= 1, got "
                             f"{actions.shape}")
        L = actions.shape[0]
        obs = np.asarray(trial.obs)
        rewards = np.asarray(trial.rewards)
        gt = np.asarray(trial.gt)
        trial_end = np.asarray(trial.trial_end)
        init_state = np.asarray(trial.init_state)
        for name, a, shape in (("obs", obs, (L, O)), ("rewards", rewards, (L,)),
                               ("gt", gt, (L,)), ("trial_end", trial_end, (L,)),
                               ("init_state", init_state, (S,))):
            if a.shape != shape:
                raise ValueError(f"trial.{name} has shape {a.shape}, this buffer expects "
                                 f"{shape} (T={L}, obs_dim={O}, state_size={S})")
        if not trial_end[-1] or trial_end[:-1].any():
            raise ValueError("trial.trial_end must be True exactly at the last step")
        burnin_obs = np.asarray(trial.burnin_obs)
        if M == 0:
            N = 0                       # this buffer keeps no burn-in
        elif burnin_obs.ndim != 2:
            raise ValueError(f"trial.burnin_obs must be 2-D [N, {O}], got {burnin_obs.shape}")
        elif (N := burnin_obs.shape[0]) > M:
            raise ValueError(f"trial has a burn-in of {N} steps but the buffer keeps at most "
                             f"max_burnin={M}; build the buffer with max_burnin >= {N}")
        if N:
            burnin_state = np.asarray(trial.burnin_state)
            if burnin_obs.shape != (N, O) or burnin_state.shape != (S,):
                raise ValueError(f"trial burn-in has shapes {burnin_obs.shape} / "
                                 f"{burnin_state.shape}, expected ({N}, {O}) / ({S},)")

        meta = {name: int(getattr(trial, name)) for name in _META_FIELDS}
        correct = bool(trial.correct)

        # shapes and metadata checked: now mutate
        slot = self._inserted % self.capacity
        if self._size == self.capacity:
            self._evict(slot)
        if self._used + L > self._step_cap:
            self._grow(self._used + L)
        start = self._head
        self._write_steps(start, (obs, actions, rewards, gt), L)
        self._head = (start + L) % self._step_cap
        self._used += L

        self._offset[slot] = start
        self._length[slot] = L
        self._init_state[slot] = init_state
        self._correct[slot] = correct
        for name, arr in self._meta.items():
            arr[slot] = meta[name]
        if N and not self._has_burnin_arrays:
            self._alloc_burnin()
        if M:
            self._burnin_len[slot] = N
        if self._has_burnin_arrays:
            self._burnin_obs[slot, : M - N] = 0
            if N:
                self._burnin_obs[slot, M - N:] = burnin_obs
                self._burnin_state[slot] = burnin_state
            else:
                self._burnin_state[slot] = 0
        self._size += 1
        self._inserted += 1
        self._payload += self._trial_payload(L, N)

    def add_many(self, trials: Iterable[Trial]) -> int:
        """Add trials in order; returns how many were added."""
        n = 0
        for t in trials:
            self.add(t)
            n += 1
        return n

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return self._size

    @property
    def num_steps(self) -> int:
        """Steps of the trials currently stored."""
        return self._used

    @property
    def inserted(self) -> int:
        """Trials ever added."""
        return self._inserted

    @property
    def evicted(self) -> int:
        """Trials evicted (oldest first) to make room."""
        return self._evicted

    def nbytes(self) -> int:
        """Bytes allocated by the buffer's arrays."""
        arrays = (*self._step_arrays(), self._offset, self._length, self._init_state,
                  self._correct, *self._meta.values(), self._burnin_len, self._burnin_obs,
                  self._burnin_state)
        return int(sum(a.nbytes for a in arrays))

    def payload_nbytes(self) -> int:
        """Sum of ``Trial.payload_nbytes()`` over the stored trials, as stored (float32 /
        int64 / bool arrays; burn-in counted only where kept)."""
        return self._payload

    def get_trial(self, slot: int) -> Trial:
        """The trial stored in ``slot`` (a copy), e.g. to inspect a sampled slot."""
        if not 0 <= slot < self._size:
            raise IndexError(f"slot {slot} is not in use (buffer holds {self._size} trials in "
                             f"slots 0..{self._size - 1})")
        L, off = int(self._length[slot]), int(self._offset[slot])
        idx = (off + np.arange(L)) % self._step_cap
        trial_end = np.zeros(L, np.bool_)
        trial_end[-1] = True
        N = int(self._burnin_len[slot]) if self.max_burnin else 0
        if N:
            burnin_obs = self._burnin_obs[slot, self.max_burnin - N:].copy()
            burnin_state = self._burnin_state[slot].copy()
        else:
            burnin_obs = np.zeros((0, self.obs_dim), np.float32)
            burnin_state = np.zeros((0,), np.float32)
        return Trial(obs=self._obs[idx], actions=self._actions[idx],
                     rewards=self._rewards[idx], gt=self._gt[idx], trial_end=trial_end,
                     init_state=self._init_state[slot].copy(), burnin_obs=burnin_obs,
                     burnin_state=burnin_state, correct=bool(self._correct[slot]),
                     **{name: int(arr[slot]) for name, arr in self._meta.items()})

    def episode_prefixes(self, n: int, rng: np.random.Generator | None = None) -> list[tuple[Trial, list[Trial]]]:
        """Up to ``n`` stored trials (trial_index > 0) whose whole episode so far is still stored,
        each with those preceding trials in order — for measuring replay-state staleness."""
        if self._size == 0:
            return []
        rng = rng or self._rng
        m = self._meta
        live = self._live_order()
        key = {}
        for slot in live:
            key[(int(m["actor_id"][slot]), int(m["env_id"][slot]), int(m["episode_id"][slot]),
                 int(m["trial_index"][slot]))] = int(slot)
        cands = [k for k in key if k[3] > 0 and all((k[0], k[1], k[2], j) in key for j in range(k[3]))]
        if not cands:
            return []
        pick = rng.choice(len(cands), size=min(n, len(cands)), replace=False)
        out = []
        for i in pick:
            k = cands[int(i)]
            prefix = [self.get_trial(key[(k[0], k[1], k[2], j)]) for j in range(k[3])]
            out.append((self.get_trial(key[k]), prefix))
        return out

    # ------------------------------------------------------------------ sampling
    def sample(self, batch_size: int, *, pad_multiple: int = 1,
               rng: np.random.Generator | None = None, meta: bool = True) -> TrialBatch:
        """``batch_size`` trials drawn uniformly (with replacement) from the stored ones.

        ``meta=False`` leaves out what only the replay side reads (``correct``,
        ``weights_version``, ``gt``; ``slots`` are always there): the learner's batches."""
        from mpn_dqn.replay.wire import batch_layout
        d = self._draw(batch_size, pad_multiple, rng)
        layout, _ = batch_layout(d["B"], d["T"], d["N"], self.obs_dim, self.state_size)
        out = {name: np.empty(shape, dtype) for name, dtype, shape, _ in layout}
        self._gather(d, out)
        batch = TrialBatch(**out, slots=d["slots"])
        if meta:
            batch.correct = self._correct[d["slots"]]
            batch.weights_version = self._meta["weights_version"][d["slots"]]
            batch.gt = np.take(self._gt, d["idx"])
        return batch

    def sample_into(self, batch_size: int, buf, offset: int, nbytes: int, *, pad_multiple: int = 1,
                    rng: np.random.Generator | None = None) -> dict:
        """Like :meth:`sample` (learner arrays only), written into ``buf[offset:offset+nbytes]``
        at the places :func:`replay.wire.batch_layout` gives.  Returns ``{"B", "T", "N"}``, or
        ``{"need": bytes}`` (nothing drawn) when the batch would not fit."""
        from mpn_dqn.replay.wire import batch_layout, batch_views
        rng = self._rng if rng is None else rng
        saved = rng.bit_generator.state
        d = self._draw(batch_size, pad_multiple, rng)
        B, T, N, O, S = d["B"], d["T"], d["N"], self.obs_dim, self.state_size
        need = batch_layout(B, T, N, O, S)[1]
        if need > nbytes:
            rng.bit_generator.state = saved                # as if nothing was drawn
            return {"need": need}
        self._gather(d, batch_views(buf, offset, B, T, N, O, S))
        return {"B": B, "T": T, "N": N}

    def _draw(self, batch_size: int, pad_multiple: int, rng) -> dict:
        """The trials of the next batch and where their steps lie."""
        if self._size == 0:
            raise ValueError("cannot sample from an empty TrialBuffer: add trials first "
                             "(wait until len(buffer) >= learning_starts)")
        B = _check_int("batch_size", batch_size, 1, "pass the number of trials per batch")
        pad = _check_int("pad_multiple", pad_multiple, 1, "pass 1 for no extra padding")
        rng = self._rng if rng is None else rng
        slots = rng.integers(0, self._size, size=B, dtype=np.int64)
        lengths = self._length[slots]
        T = -(-int(lengths.max()) // pad) * pad
        steps = np.arange(T)
        mask = steps < lengths[:, None]
        idx = self._offset[slots, None] + steps
        idx[idx >= self._step_cap] -= self._step_cap
        idx[~mask] = self._step_cap                         # the zero row
        blen = self._burnin_len[slots] if self._has_burnin_arrays else np.zeros(B, np.int64)
        N = int(blen.max())
        return {"B": B, "T": T, "N": N, "slots": slots, "lengths": lengths, "mask": mask, "idx": idx,
                "blen": blen}

    def _gather(self, d: dict, out: dict) -> None:
        """Every learner array of the draw ``d`` into ``out`` (arrays of the right shapes):
        one ``np.take`` each (mode "clip": the indices are valid, and numpy buffers the output
        otherwise); padded positions read a zero row kept past the end of the step ring, so
        nothing is zeroed afterwards."""
        idx, slots, N, M = d["idx"], d["slots"], d["N"], self.max_burnin
        np.take(self._obs, idx, axis=0, out=out["obs"], mode="clip")
        np.take(self._actions, idx, out=out["actions"], mode="clip")
        np.take(self._rewards, idx, out=out["rewards"], mode="clip")
        out["mask"][...] = d["mask"]
        out["lengths"][...] = d["lengths"]
        np.take(self._init_state, slots, axis=0, out=out["init_state"], mode="clip")
        if N:
            np.take(self._burnin_obs[:, M - N:], slots, axis=0, out=out["burnin_obs"], mode="clip")
            np.greater_equal(np.arange(N), (N - d["blen"])[:, None], out=out["burnin_mask"])
            np.take(self._burnin_state, slots, axis=0, out=out["burnin_state"], mode="clip")

    # ------------------------------------------------------------------ snapshots
    def state_dict(self) -> dict[str, np.ndarray | int]:
        """Everything needed to restore the contents, slot numbering, counters and sampling
        RNG exactly.  Only numpy arrays and Python ints (no objects), so it can be saved with
        ``np.savez`` and loaded with ``allow_pickle=False``.  Steps are stored compacted."""
        n = self._size
        steps = self._compacted_steps()
        offsets = (self._offset[:n] - self._tail) % self._step_cap
        rs = self._rng.bit_generator.state
        mask64 = (1 << 64) - 1
        rng_state = np.array([rs["state"]["state"] >> 64, rs["state"]["state"] & mask64,
                              rs["state"]["inc"] >> 64, rs["state"]["inc"] & mask64,
                              rs["has_uint32"], rs["uinteger"]], dtype=np.uint64)
        d: dict[str, np.ndarray | int] = {
            "format": _STATE_FORMAT, "capacity": self.capacity, "obs_dim": self.obs_dim,
            "state_size": self.state_size, "max_burnin": self.max_burnin, "size": n,
            "inserted": self._inserted, "evicted": self._evicted, "rng_state": rng_state,
            "obs": steps[0], "actions": steps[1], "rewards": steps[2], "gt": steps[3],
            "offset": offsets.copy(), "length": self._length[:n].copy(),
            "init_state": self._init_state[:n].copy(), "correct": self._correct[:n].copy(),
            "burnin_len": self._burnin_len[:n].copy(),
            # (0, ...) while no trial with a burn-in has been stored
            "burnin_obs": self._burnin_obs[:n].copy(),
            "burnin_state": self._burnin_state[:n].copy(),
        }
        for name, arr in self._meta.items():
            d["meta_" + name] = arr[:n].copy()
        return d

    def load_state_dict(self, d: dict) -> None:
        """Restore from :meth:`state_dict` (also accepts a loaded ``.npz``, whose scalars are
        0-d arrays).  The buffer's configuration must match; raises ValueError otherwise or if
        the state is inconsistent, leaving this buffer unchanged."""
        def scalar(key: str) -> int:
            return _scalar(d, key, "; was it made by TrialBuffer.state_dict()?")

        def array(key: str, shape: tuple, dtype) -> np.ndarray:
            if key not in d:
                raise ValueError(f"state dict lacks {key!r}")
            a = np.asarray(d[key])
            if a.shape != shape:
                raise ValueError(f"state dict {key!r} has shape {a.shape}, expected {shape}")
            return a.astype(dtype, copy=True)

        if scalar("format") != _STATE_FORMAT:
            raise ValueError(f"unsupported TrialBuffer state format {scalar('format')}")
        for key in ("capacity", "obs_dim", "state_size", "max_burnin"):
            if scalar(key) != getattr(self, key):
                raise ValueError(f"state dict has {key}={scalar(key)} but this buffer has "
                                 f"{getattr(self, key)}; build the buffer with the same {key}")
        C, O, S, M = self.capacity, self.obs_dim, self.state_size, self.max_burnin
        n, inserted, evicted = scalar("size"), scalar("inserted"), scalar("evicted")
        if not (0 <= n <= C and n == min(inserted, C) and evicted == inserted - n):
            raise ValueError(f"inconsistent counters: size={n} inserted={inserted} "
                             f"evicted={evicted} capacity={C}")
        length = array("length", (n,), np.int64)
        offset = array("offset", (n,), np.int64)
        used = int(length.sum())
        if n and length.min() < 1:
            raise ValueError("state dict has a trial of length < 1")
        first = inserted % C if n == C else 0
        order = (first + np.arange(n)) % C
        expect = np.concatenate([[0], np.cumsum(length[order])[:-1]]) if n else offset
        if not np.array_equal(offset[order], expect):
            raise ValueError("state dict offsets do not match the FIFO order of the trials")
        obs = array("obs", (used, O), np.float32)
        actions = array("actions", (used,), np.int64)
        rewards = array("rewards", (used,), np.float32)
        gt = array("gt", (used,), np.int64)
        init_state = array("init_state", (n, S), np.float32)
        correct = array("correct", (n,), np.bool_)
        burnin_len = array("burnin_len", (n if M else 0,), np.int64)
        if M and n and (burnin_len.min() < 0 or burnin_len.max() > M):
            raise ValueError(f"state dict burn-in lengths must be in [0, {M}]")
        nb = n if M and "burnin_obs" in d and np.shape(d["burnin_obs"])[0] else 0
        burnin_obs = array("burnin_obs", (nb, M, O), np.float32)
        burnin_state = array("burnin_state", (nb, S), np.float32)
        if nb == 0 and M and n and burnin_len.max() > 0:
            raise ValueError("state dict has burn-in lengths but no burn-in arrays")
        meta = {name: array("meta_" + name, (n,), np.int64) for name in _META_FIELDS}
        r = [int(x) for x in array("rng_state", (6,), np.uint64)]
        rng = np.random.Generator(np.random.PCG64())
        try:
            rng.bit_generator.state = {
                "bit_generator": "PCG64",
                "state": {"state": (r[0] << 64) | r[1], "inc": (r[2] << 64) | r[3]},
                "has_uint32": r[4], "uinteger": r[5]}
        except (ValueError, TypeError) as e:
            raise ValueError(f"state dict has an invalid rng_state: {e}") from None

        # all checked: commit
        self._alloc_steps(max(_MIN_STEPS, used))
        self._obs[:used], self._actions[:used] = obs, actions
        self._rewards[:used], self._gt[:used] = rewards, gt
        for a in (self._offset, self._length, self._init_state, self._correct,
                  *self._meta.values(), self._burnin_len):
            a[...] = 0
        if nb:
            self._alloc_burnin()
        else:
            self._burnin_obs = np.zeros((0, M, O), np.float32)
            self._burnin_state = np.zeros((0, S), np.float32)
        self._offset[:n], self._length[:n] = offset, length
        self._init_state[:n], self._correct[:n] = init_state, correct
        for name, arr in meta.items():
            self._meta[name][:n] = arr
        if M:
            self._burnin_len[:n] = burnin_len
        if nb:
            self._burnin_obs[:n], self._burnin_state[:n] = burnin_obs, burnin_state
        self._head = used % self._step_cap
        self._tail = 0
        self._used = used
        self._size = n
        self._inserted = inserted
        self._evicted = evicted
        bl = burnin_len if M else np.zeros(n, np.int64)
        self._payload = sum(self._trial_payload(int(L), int(b)) for L, b in zip(length, bl))
        self._rng = rng

    @classmethod
    def from_state_dict(cls, d: dict) -> "TrialBuffer":
        """A new buffer configured and filled from :meth:`state_dict`."""
        buf = cls(_scalar(d, "capacity"), _scalar(d, "obs_dim"), _scalar(d, "state_size"),
                  max_burnin=_scalar(d, "max_burnin"))
        buf.load_state_dict(d)
        return buf
