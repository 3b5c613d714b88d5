"""Replay sampling: TrialBuffer.sample(32) against padding the same trials one by one in Python.

    python tests/benchmarks/bench_replay.py [--repeats 7] [--batch 32]

The buffer (500 trials of 14-40 steps, obs 5, state 768, burn-in 10, as a dt-100 MPN run holds)
is sampled with its vectorised gather; the baseline builds the same padded batch from a list of
Trial objects with a Python loop (what a straightforward replay would do).  Prints medians over
repeats, the ratio baseline / buffer, and a final one-line JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mpn_dqn.replay import TrialBuffer  # noqa: E402
from tests.helpers import make_trial  # noqa: E402


def python_batch(trials, slots):
    T = max(trials[s].length for s in slots)
    B, O = len(slots), trials[0].obs.shape[1]
    obs = np.zeros((B, T, O), np.float32)
    act = np.zeros((B, T), np.int64)
    rew = np.zeros((B, T), np.float32)
    mask = np.zeros((B, T), bool)
    init = np.stack([trials[s].init_state for s in slots])
    for i, s in enumerate(slots):
        t = trials[s]
        obs[i, :t.length] = t.obs
        act[i, :t.length] = t.actions
        rew[i, :t.length] = t.rewards
        mask[i, :t.length] = True
    return obs, act, rew, mask, init


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    trials = [make_trial(rng, int(rng.integers(14, 41)), 5, 768, burnin=10) for _ in range(500)]
    buf = TrialBuffer(500, 5, 768, max_burnin=10)
    buf.add_many(trials)
    srng = np.random.default_rng(1)
    buf.sample(args.batch, rng=srng)
    ours, base = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(200):
            buf.sample(args.batch, rng=srng)
        ours.append((time.perf_counter() - t0) / 200)
        slots = [srng.integers(0, 500, args.batch) for _ in range(200)]
        t0 = time.perf_counter()
        for s in slots:
            python_batch(trials, s)
        base.append((time.perf_counter() - t0) / 200)
    m_ours, m_base = statistics.median(ours), statistics.median(base)
    print(f"TrialBuffer.sample({args.batch}): {m_ours * 1e6:.0f} us (median of {args.repeats})")
    print(f"Python loop over Trial objects:  {m_base * 1e6:.0f} us")
    print(f"ratio: {m_base / m_ours:.2f}x")
    print(json.dumps({"benchmark": "replay_sample", "batch": args.batch, "buffer_us": round(m_ours * 1e6, 1),
                      "python_loop_us": round(m_base * 1e6, 1), "ratio": round(m_base / m_ours, 2)}))


if __name__ == "__main__":
    main()
