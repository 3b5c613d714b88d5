"""Actor benchmark: env steps/s of one actor process against the raw NeuroGym step rate.

The actor path is everything an actor does per step: K envs in lockstep, one batched numpy
MPN call, ε-greedy, trial bookkeeping, and msgpack encoding of completed trials.  The raw rate
steps the same K envs (same task, dt, seeds) with precomputed random actions and nothing else,
in the same run.  Medians over repeats, alternating the two.

    python tests/benchmarks/bench_actor.py [--env-name ...] [--envs 8] [--steps 4000] [--repeats 5]

Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mpn_dqn.actors.collector import TrialCollector  # noqa: E402
from mpn_dqn.common.codec import encode_trials  # noqa: E402
from mpn_dqn.common.networks import NetSpec, QNetwork, export_params  # noqa: E402
from mpn_dqn.common.tasks import make_env, task_dims  # noqa: E402


def raw_rate(env_name, dt, K, steps, seed):
    envs = [make_env(env_name, dt, seed=seed + k) for k in range(K)]
    for k, e in enumerate(envs):
        e.reset(seed=seed + k)
    n_act = envs[0].action_space.n
    acts = np.random.default_rng(0).integers(0, n_act, size=(steps, K))
    t0 = time.perf_counter()
    for t in range(steps):
        for k in range(K):
            envs[k].step(int(acts[t, k]))
    dt_s = time.perf_counter() - t0
    return steps * K / dt_s


def actor_rate(env_name, dt, K, steps, seed, hidden):
    obs_dim, n_act = task_dims(env_name, dt)
    spec = NetSpec(core="mpn", obs_dim=obs_dim, num_actions=n_act, hidden_dim=hidden, learn_plasticity=True)
    col = TrialCollector(env_name, dt, spec, export_params(QNetwork(spec)), num_envs=K,
                         trials_per_episode=10, seed=seed)
    col.epsilon = 0.1
    n_trials, n_bytes = 0, 0
    pending = []
    t0 = time.perf_counter()
    for _ in range(steps):
        trials, _ = col.step()
        pending.extend(trials)
        if len(pending) >= 2 * K:
            n_bytes += len(encode_trials(pending))
            n_trials += len(pending)
            pending = []
    dt_s = time.perf_counter() - t0
    return steps * K / dt_s, n_trials, n_bytes / max(1e-9, dt_s)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env-name", default="ContextDecisionMaking-v0")
    ap.add_argument("--dt", type=int, default=100)
    ap.add_argument("--envs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3000, help="lockstep steps per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    raws, acts, bps = [], [], []
    # warm-up, not timed: numba compiles (or loads from its cache) the actor's MPN step once
    actor_rate(args.env_name, args.dt, args.envs, 50, 99, args.hidden)
    for r in range(args.repeats):
        raws.append(raw_rate(args.env_name, args.dt, args.envs, args.steps, 100 + r))
        a, _, b = actor_rate(args.env_name, args.dt, args.envs, args.steps, 100 + r, args.hidden)
        acts.append(a)
        bps.append(b)
    raw, act = statistics.median(raws), statistics.median(acts)
    print(f"raw NeuroGym  : median {raw:9.0f} env steps/s  runs {[round(x) for x in raws]}")
    print(f"actor (K={args.envs}) : median {act:9.0f} env steps/s  runs {[round(x) for x in acts]}")
    print(f"fraction of raw: {act / raw:.3f};  trial bytes into replay: {statistics.median(bps) / 1e6:.2f} MB/s")
    print(json.dumps({"benchmark": "actor", "env_name": args.env_name, "dt": args.dt, "envs": args.envs,
                      "hidden": args.hidden, "env_steps_per_s": round(act), "raw_env_steps_per_s": round(raw),
                      "fraction_of_raw": round(act / raw, 3),
                      "bytes_per_s_into_replay": round(statistics.median(bps))}))


if __name__ == "__main__":
    main()
