"""Memory benchmark: replay bytes per stored trial vs payload, and peak learner memory vs
``--bptt-chunk-size``.

Replay: a full ``TrialBuffer`` of trials with the lengths of the dt = 100 and dt = 10 regimes
(MPN state of H=128); ratio = bytes allocated / bytes of trial payload (goal <= 1.5).
Learner: one TD update on B=32 trials of T=400 steps (the dt = 10 regime) for each chunk size,
each in a fresh subprocess; reported are the peak bytes of tensors saved for backward (exact,
counted with autograd hooks) and the process's peak RSS growth.  The baseline is the whole-
trial update (no chunking) measured in the same run.

    python tests/benchmarks/bench_memory.py [--chunks 0 200 100 40 20]

Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
sys.path.insert(0, ROOT)


def replay_ratio(lengths: tuple[int, int], capacity: int = 500, obs_dim: int = 5, hidden: int = 128) -> dict:
    import numpy as np

    from mpn_dqn.common.trial import Trial
    from mpn_dqn.replay.buffer import TrialBuffer
    rng = np.random.default_rng(0)
    S = (obs_dim + 1) * hidden
    buf = TrialBuffer(capacity, obs_dim, S)
    for _ in range(2 * capacity):
        L = int(rng.integers(lengths[0], lengths[1] + 1))
        buf.add(Trial(obs=rng.normal(size=(L, obs_dim)).astype(np.float32), actions=rng.integers(0, 3, L),
                      rewards=np.zeros(L, np.float32), gt=np.zeros(L, np.int64),
                      trial_end=np.arange(L) == L - 1, init_state=rng.normal(size=S).astype(np.float32)))
    return {"lengths": list(lengths), "trials": len(buf), "bytes_per_trial": buf.nbytes() / len(buf),
            "payload_per_trial": buf.payload_nbytes() / len(buf), "ratio": buf.nbytes() / buf.payload_nbytes()}


def learner_child(chunk: int, B: int, T: int) -> None:
    import torch
    torch.set_num_threads(1)
    from mpn_dqn.common.networks import NetSpec
    from mpn_dqn.learner.learner import Learner
    from mpn_dqn.learner.loss import TensorBatch

    class Saved:
        alive = peak = 0

    def pack(t):
        n = t.numel() * t.element_size()
        Saved.alive += n
        Saved.peak = max(Saved.peak, Saved.alive)

        class Box:
            def __del__(self_inner):
                Saved.alive -= n
        box = Box()
        box.t = t
        return box

    spec = NetSpec(core="mpn", obs_dim=5, num_actions=3, hidden_dim=128)
    learner = Learner(spec, gamma=0.999, n_step=5, chunk_size=chunk or None)
    g = torch.Generator().manual_seed(0)
    batch = TensorBatch(obs=torch.randn(B, T, 5, generator=g), actions=torch.randint(0, 3, (B, T), generator=g),
                        rewards=torch.zeros(B, T), mask=torch.ones(B, T, dtype=torch.bool),
                        init_state=torch.zeros(B, spec.state_size))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        learner.update(batch)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"chunk": chunk, "saved_peak_bytes": Saved.peak, "rss_growth_bytes": (rss1 - rss0) * 1024}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 200, 100, 40, 20], help="0 = whole trial")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        learner_child(args.child, args.batch, args.steps)
        return
    replay = [replay_ratio((14, 40)), replay_ratio((145, 465))]
    for r in replay:
        print(f"replay, trial lengths {r['lengths']}: {r['bytes_per_trial'] / 1024:.1f} KiB/trial stored vs "
              f"{r['payload_per_trial'] / 1024:.1f} KiB payload -> ratio {r['ratio']:.3f}")
    rows = []
    for c in args.chunks:
        out = subprocess.run([sys.executable, __file__, "--child", str(c), "--batch", str(args.batch),
                              "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["saved_peak_bytes"]
    for r in rows:
        r["saved_vs_whole_trial"] = r["saved_peak_bytes"] / base
        print(f"learner B={args.batch} T={args.steps} chunk {r['chunk'] or 'whole trial':>11}: "
              f"autograd-saved peak {r['saved_peak_bytes'] / 2**20:7.1f} MiB ({r['saved_vs_whole_trial']:.2f}x), "
              f"RSS growth {r['rss_growth_bytes'] / 2**20:7.1f} MiB")
    print(json.dumps({"benchmark": "memory", "replay": [{k: round(v, 3) if isinstance(v, float) else v
                                                          for k, v in r.items()} for r in replay],
                      "learner": rows}))


if __name__ == "__main__":
    main()
