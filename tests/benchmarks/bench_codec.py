"""Trial codec benchmark: µs per trial to encode and to decode a trial batch, for the columnar
format (``common/codec.py``, version 2) and for a baseline that re-implements the version 1
per-trial layout here (one msgpack map per trial, one ``{"dtype", "shape", "data"}`` map per
array field; decoded with ``msgpack.unpackb``, ``np.frombuffer(...).copy()`` per field and the
same finiteness / range / shape checks, trial by trial).

Two cases, with the shapes an actor of the default MPN sends (obs_dim 5, state 6*128 floats,
no burn-in, batches of ``--batch`` trials, 16 = twice the default 8 envs per actor):

* ``dt100``: trial lengths 14-40 steps,
* ``dt10``:  trial lengths 150-400 steps (the same tasks at dt 10 ms).

Each repeat times every codec over the same messages (the codecs take turns, so load on the
machine hits them alike); the numbers are medians over ``--repeats`` (>= 5) repeats.  Prints a
table with the ratios and ends with one JSON line (the ``dt100`` case in the top-level keys)::

    python tests/benchmarks/bench_codec.py [--batch 16] [--repeats 7] [--trials 2000]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402

from mpn_dqn.common.codec import TrialSchema, decode_trials, encode_trials  # noqa: E402
from mpn_dqn.common.trial import Trial  # noqa: E402

OBS, STATE, ACTIONS = 5, 6 * 128, 3
CASES = {"dt100": (14, 40), "dt10": (150, 400)}
INT_FIELDS = ("ground_truth", "fix_breaks", "episode_id", "actor_id", "env_id", "trial_index",
              "weights_version")


def make_trials(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[Trial]:
    """Trials as the collector makes them (no burn-in: the Trial defaults)."""
    out = []
    for i in range(n):
        T = int(rng.integers(lo, hi + 1))
        trial_end = np.zeros(T, np.bool_)
        trial_end[-1] = True
        rewards = np.zeros(T, np.float32)
        rewards[-1] = float(rng.integers(0, 2))
        out.append(Trial(
            obs=rng.standard_normal((T, OBS)).astype(np.float32),
            actions=rng.integers(0, ACTIONS, T).astype(np.int64), rewards=rewards,
            gt=rng.integers(0, ACTIONS, T).astype(np.int64), trial_end=trial_end,
            init_state=rng.standard_normal(STATE).astype(np.float32),
            ground_truth=int(rng.integers(0, ACTIONS)), correct=bool(rewards[-1] > 0),
            fix_breaks=int(rng.integers(0, 3)), episode_id=i // 10, actor_id=3, env_id=i % 8,
            trial_index=i % 10, weights_version=1234))
    return out


# --- the baseline: version 1, one map per trial ---------------------------------------------

_V1_ARRAYS = (("obs", "<f4"), ("actions", "<i8"), ("rewards", "<f4"), ("gt", "<i8"),
              ("trial_end", "|b1"), ("init_state", "<f4"), ("burnin_obs", "<f4"),
              ("burnin_state", "<f4"))
_V1_KEYS = frozenset(name for name, _ in _V1_ARRAYS) | frozenset(INT_FIELDS) | {"correct"}
_ARRAY_KEYS = frozenset({"dtype", "shape", "data"})


def v1_encode(trials: list[Trial]) -> bytes:
    out = []
    for t in trials:
        obj = {}
        for name, wire in _V1_ARRAYS:
            a = getattr(t, name)
            if not (type(a) is np.ndarray and a.dtype == wire and a.flags.c_contiguous):
                a = np.asarray(a, dtype=wire, order="C")
            obj[name] = {"dtype": wire, "shape": a.shape, "data": a.tobytes()}
        for name in INT_FIELDS:
            obj[name] = int(getattr(t, name))
        obj["correct"] = bool(t.correct)
        out.append(obj)
    return msgpack.packb({"schema": "mpn-dqn/trials", "v": 1, "trials": out}, use_bin_type=True)


def _no_duplicates(pairs: list) -> dict:
    d = {}
    for k, v in pairs:
        if not isinstance(k, str) or k in d:
            raise ValueError(f"bad map key {k!r}")
        d[k] = v
    return d


def _v1_array(obj, wire: str, shape_ok) -> np.ndarray:
    if not isinstance(obj, dict) or set(obj) != _ARRAY_KEYS or obj["dtype"] != wire:
        raise ValueError("bad array map")
    shape, data = obj["shape"], obj["data"]
    if not isinstance(shape, list) or any(type(d) is not int or d < 0 for d in shape):
        raise ValueError("bad shape")
    if not shape_ok(shape) or not isinstance(data, bytes) \
            or len(data) != math.prod(shape) * np.dtype(wire).itemsize:
        raise ValueError("shape and data disagree")
    a = np.frombuffer(data, wire).reshape(shape).copy()
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError("NaN or infinity")
    if a.dtype.kind == "b" and len(data) and np.frombuffer(data, np.uint8).max() > 1:
        raise ValueError("bool bytes")
    return a


def v1_decode(payload: bytes, s: TrialSchema) -> list[Trial]:
    size = len(payload)
    if size > s.max_message_bytes:
        raise ValueError("too big")
    msg = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True,
                          object_pairs_hook=_no_duplicates, max_bin_len=size,
                          max_str_len=min(size, 1024), max_array_len=min(size, s.max_trials),
                          max_map_len=min(size, 64), max_ext_len=0)
    if not isinstance(msg, dict) or set(msg) != {"schema", "v", "trials"} \
            or msg["schema"] != "mpn-dqn/trials" or msg["v"] != 1 \
            or not isinstance(msg["trials"], list):
        raise ValueError("bad header")
    out = []
    for obj in msg["trials"]:
        if not isinstance(obj, dict) or set(obj) != _V1_KEYS:
            raise ValueError("bad trial keys")
        actions = _v1_array(obj["actions"], "<i8",
                            lambda sh: len(sh) == 1 and 1 <= sh[0] <= s.max_trial_len)
        T = actions.shape[0]
        obs = _v1_array(obj["obs"], "<f4", lambda sh: sh == [T, s.obs_dim])
        rewards = _v1_array(obj["rewards"], "<f4", lambda sh: sh == [T])
        gt = _v1_array(obj["gt"], "<i8", lambda sh: sh == [T])
        trial_end = _v1_array(obj["trial_end"], "|b1", lambda sh: sh == [T])
        init_state = _v1_array(obj["init_state"], "<f4", lambda sh: sh == [s.state_size])
        burnin_obs = _v1_array(obj["burnin_obs"], "<f4", lambda sh: len(sh) == 2 and (
            sh[0] <= s.max_burnin and (sh[1] == s.obs_dim or sh == [0, 0])))
        N = burnin_obs.shape[0]
        if N == 0:
            burnin_obs = np.zeros((0, s.obs_dim), np.float32)
        burnin_state = _v1_array(obj["burnin_state"], "<f4",
                                 lambda sh: sh == [s.state_size] or (N == 0 and sh == [0]))
        if actions.min() < 0 or actions.max() >= s.num_actions \
                or gt.min() < 0 or gt.max() >= s.num_actions:
            raise ValueError("action out of range")
        if not trial_end[-1] or trial_end[:-1].any():
            raise ValueError("trial_end")
        ints = {}
        for name in INT_FIELDS:
            v = obj[name]
            if type(v) is not int or not -2 ** 63 <= v < 2 ** 63:
                raise ValueError(name)
            ints[name] = v
        if not 0 <= ints["fix_breaks"] <= T or type(obj["correct"]) is not bool:
            raise ValueError("fix_breaks / correct")
        out.append(Trial(obs=obs, actions=actions, rewards=rewards, gt=gt, trial_end=trial_end,
                         init_state=init_state, burnin_obs=burnin_obs, burnin_state=burnin_state,
                         correct=obj["correct"], **ints))
    return out


# --- timing ----------------------------------------------------------------------------------

def _same(a: list[Trial], b: list[Trial]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("obs", "actions", "rewards", "gt", "trial_end", "init_state"):
            u, v = getattr(x, name), getattr(y, name)
            assert u.dtype == v.dtype and np.array_equal(u, v), name
        assert y.burnin_obs.shape == (0, OBS) and y.burnin_state.shape == (0,)
        for name in (*INT_FIELDS, "correct"):
            assert getattr(x, name) == getattr(y, name), name


def _time_per_trial(fn, items: list, n_trials: int) -> float:
    t0 = time.perf_counter()
    for it in items:
        fn(it)
    return (time.perf_counter() - t0) / n_trials * 1e6


def run_case(lo: int, hi: int, batch: int, n_trials: int, repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    trials = make_trials(rng, n_trials, lo, hi)
    batches = [trials[i:i + batch] for i in range(0, len(trials), batch)]
    schema = TrialSchema(OBS, STATE, ACTIONS)
    new_msgs = [encode_trials(b) for b in batches]
    old_msgs = [v1_encode(b) for b in batches]
    for b, m_new, m_old in zip(batches, new_msgs, old_msgs):     # both codecs are correct
        _same(b, decode_trials(m_new, schema))
        _same(b, v1_decode(m_old, schema))
    results = {k: [] for k in ("encode", "decode", "baseline_encode", "baseline_decode")}
    n = len(trials)
    for _ in range(repeats):
        results["encode"].append(_time_per_trial(encode_trials, batches, n))
        results["baseline_encode"].append(_time_per_trial(v1_encode, batches, n))
        results["decode"].append(_time_per_trial(lambda m: decode_trials(m, schema), new_msgs, n))
        results["baseline_decode"].append(_time_per_trial(lambda m: v1_decode(m, schema),
                                                          old_msgs, n))
    med = {k: statistics.median(v) for k, v in results.items()}
    steps = sum(t.length for t in trials)
    med["mean_trial_len"] = steps / n
    med["bytes_per_trial"] = sum(map(len, new_msgs)) / n
    med["baseline_bytes_per_trial"] = sum(map(len, old_msgs)) / n
    return med


def sample_path(lo: int, hi: int, batch_sizes, repeats: int, seed: int) -> dict:
    """µs per *sampled* trial of the learner's side of replay: ``TrialBuffer.sample`` +
    ``encode_batch`` (replay server) + ``decode_batch`` (learner), on a buffer of 500 trials."""
    from mpn_dqn.replay.buffer import TrialBuffer
    from mpn_dqn.replay.wire import decode_batch, encode_batch
    rng = np.random.default_rng(seed)
    buf = TrialBuffer(500, OBS, STATE, seed=seed)
    buf.add_many(make_trials(rng, 500, lo, hi))
    out = {}
    for B in batch_sizes:
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(20):
                decode_batch(encode_batch(buf.sample(B, pad_multiple=32)), OBS, STATE)
            runs.append((time.perf_counter() - t0) / (20 * B) * 1e6)
        out[B] = statistics.median(runs)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="trials per message")
    ap.add_argument("--trials", type=int, default=2000, help="trials per case (dt100; dt10 "
                                                             "uses a fifth as many)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be at least 5")
    res = {}
    for name, (lo, hi) in CASES.items():
        n = args.trials if name == "dt100" else max(args.trials // 5, args.batch)
        res[name] = run_case(lo, hi, args.batch, n, args.repeats, args.seed)
    print(f"batches of {args.batch} trials, obs_dim {OBS}, state {STATE}, medians of "
          f"{args.repeats} repeats, µs per trial")
    print(f"{'case':<6} {'len':>5} {'encode':>8} {'v1 enc':>8} {'ratio':>6} {'decode':>8} "
          f"{'v1 dec':>8} {'ratio':>6} {'bytes':>7} {'v1 bytes':>8}")
    for name, r in res.items():
        print(f"{name:<6} {r['mean_trial_len']:>5.0f} {r['encode']:>8.2f} "
              f"{r['baseline_encode']:>8.2f} {r['baseline_encode'] / r['encode']:>5.1f}x "
              f"{r['decode']:>8.2f} {r['baseline_decode']:>8.2f} "
              f"{r['baseline_decode'] / r['decode']:>5.1f}x {r['bytes_per_trial']:>7.0f} "
              f"{r['baseline_bytes_per_trial']:>8.0f}")
    d, d10 = res["dt100"], res["dt10"]
    samp = sample_path(*CASES["dt100"], (32, 256), args.repeats, args.seed)
    print("learner side (sample + encode batch + decode batch), dt100 lengths, µs per sampled "
          "trial: " + ", ".join(f"B {B}: {v:.2f}" for B, v in samp.items())
          + f"  ({samp[256] / d['decode']:.1f}x the insert side's decode per trial)")
    print(json.dumps({
        "sample_path_us_per_trial_b32": round(samp[32], 3),
        "sample_path_us_per_trial_b256": round(samp[256], 3),
        "benchmark": "codec", "batch": args.batch, "repeats": args.repeats,
        "encode_us_per_trial": round(d["encode"], 3),
        "decode_us_per_trial": round(d["decode"], 3),
        "baseline_encode_us_per_trial": round(d["baseline_encode"], 3),
        "baseline_decode_us_per_trial": round(d["baseline_decode"], 3),
        "encode_speedup": round(d["baseline_encode"] / d["encode"], 2),
        "decode_speedup": round(d["baseline_decode"] / d["decode"], 2),
        "dt10_encode_us_per_trial": round(d10["encode"], 3),
        "dt10_decode_us_per_trial": round(d10["decode"], 3),
        "dt10_baseline_encode_us_per_trial": round(d10["baseline_encode"], 3),
        "dt10_baseline_decode_us_per_trial": round(d10["baseline_decode"], 3),
        "dt10_encode_speedup": round(d10["baseline_encode"] / d10["encode"], 2),
        "dt10_decode_speedup": round(d10["baseline_decode"] / d10["decode"], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
