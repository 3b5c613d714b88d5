"""A GPU learner fed from a replay server in its own process: delivered trials against updates.

No Ray and no NeuroGym (it runs on a bare GPU machine).  A :class:`replay.server.ReplayServer`
is filled with msgpack trial messages (dt-100 lengths: 14-40 steps, obs 5, MPN H=128, state
768); then, for each batch size:

1. **delivery**: ``server.sample(B)`` + ``Learner.to_tensors`` + synchronise: the trials/s one
   thread hands to the device;
2. **updates**: ``Learner.update`` on one batch already on the device: the trials/s the GPU
   consumes when it never waits (the baseline the other two are measured against);
3. **pipelined**: a :class:`learner.worker.LearnerWorker` on that server with its prefetch
   and training threads (``start()``) for a few seconds, the way it trains: trials/s consumed.

    python tests/benchmarks/bench_replay_gpu.py [--batches 256 1024] [--seconds 8]

Prints a table and, last, one JSON line.  (numba is only needed by the actors' CPU kernels; on
a machine without it a stand-in decorator lets the modules import.)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

try:
    import numba  # noqa: F401
except ImportError:                      # the GPU learner never calls the numba kernels
    stub = types.ModuleType("numba")
    stub.njit = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda f: f))
    sys.modules["numba"] = stub

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mpn_dqn.common.codec import encode_trials  # noqa: E402
from mpn_dqn.common.config import TrainConfig  # noqa: E402
from mpn_dqn.common.networks import NetSpec  # noqa: E402
from mpn_dqn.common.roles import LocalReplay  # noqa: E402
from mpn_dqn.learner.worker import LearnerWorker  # noqa: E402
from mpn_dqn.replay.server import ReplayServer  # noqa: E402
from tests.helpers import make_trial  # noqa: E402


def filled_server(spec: NetSpec, trials: int, B: int) -> ReplayServer:
    server = ReplayServer(trials, {"obs_dim": spec.obs_dim, "state_size": spec.state_size,
                                   "num_actions": spec.num_actions, "max_burnin": 0},
                          samples_per_insert=1e9, min_size=1, batch_size=B, error_buffer=1e15)
    rng = np.random.default_rng(0)
    for i in range(0, trials, 256):
        batch = [make_trial(rng, int(rng.integers(14, 41)), spec.obs_dim, spec.state_size,
                            num_actions=spec.num_actions) for _ in range(256)]
        assert server.insert(encode_trials(batch), "bench", i)["status"] == "ok"
    return server


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rate(fn, n: int, B: int, repeats: int) -> float:
    """Median trials/s of ``n`` calls of ``fn`` over ``repeats``."""
    fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        out.append(n * B / (time.perf_counter() - t0))
    return statistics.median(out)


def pipelined(cfg: dict, spec: dict, server: ReplayServer, seconds: float) -> float:
    w = LearnerWorker(cfg, spec, LocalReplay(server), publish_period=10 ** 9)
    w.start()
    time.sleep(min(3.0, seconds / 2))    # warm-up: CUDA graphs captured for the batch shapes
    u0, t0 = w.learner.updates, time.perf_counter()
    time.sleep(seconds)
    u1, t1 = w.learner.updates, time.perf_counter()
    w.stop()
    if w.error:
        raise RuntimeError(w.error)
    return (u1 - u0) * w.cfg.trial_batch_size / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trials", type=int, default=8192, help="trials in the replay server")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    spec = NetSpec(core="mpn", obs_dim=5, num_actions=3, hidden_dim=128)
    print(f"device: {torch.cuda.get_device_name(0) if dev == 'cuda' else 'cpu'}; torch {torch.__version__}")
    rows = []
    for B in args.batches:
        cfg = TrainConfig(env_name="ContextDecisionMaking-v0", dt=100, device=dev, trial_batch_size=B,
                          learning_starts=B, buffer_size=max(B, args.trials)).to_dict()
        server = filled_server(spec, args.trials, B)
        w = LearnerWorker(cfg, spec.to_dict(), LocalReplay(server), publish_period=10 ** 9)
        n = max(4, 8192 // B)
        deliver = rate(lambda: w.learner.to_tensors(server.sample(B)), n, B, args.repeats)
        tb = w.learner.to_tensors(server.sample(B))
        updates = rate(lambda: w.learner.update(tb), n, B, args.repeats)
        new = pipelined(cfg, spec.to_dict(), server, args.seconds)
        rows.append({"batch": B, "delivered_trials_per_s": round(deliver), "update_trials_per_s": round(updates),
                     "pipelined_trials_per_s": round(new), "pipelined_over_updates": round(new / updates, 3),
                     "delivery_over_updates": round(deliver / updates, 3)})
        print(f"B={B}: delivery {deliver:,.0f} trials/s (one thread: sample + copy to the device), "
              f"updates {updates:,.0f} trials/s, pipelined {new:,.0f} ({new / updates:.2f} of the update rate)")
    print(json.dumps({"benchmark": "replay_gpu", "device": dev, "rows": rows}))


if __name__ == "__main__":
    main()
