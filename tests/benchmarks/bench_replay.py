"""Delivered trials, replay server -> learner, through real Ray actors: this tree against a baseline.

    python tests/benchmarks/bench_replay.py --baseline-rev REV [--batches 32 256 1024] [--repeats 3]

For each tree (this one and ``REV``, checked out in a temporary git worktree; runs alternate)
a child process starts an embedded Ray, fills replay-server actors (``replay.server.ReplayServer``
as the training job runs it: threaded, no CPU reserved) with msgpack trial messages of dt-100
lengths (14-40 steps) and dt-10 lengths (140-400 steps), obs 5, MPN state 768, and a consumer
actor in the learner's place requests batches the way the learner's prefetch does (one request
in flight per replay server) and turns each into torch tensors (decoding it first where the
tree's replay sends msgpack).  Measured per configuration (lengths x batch size x 1 or 2
replay servers):

* ``us_per_trial``: wall time per delivered trial, learner request to torch batch;
* ``replay_cpu_us_per_trial``: CPU time the replay-server processes spent per delivered
  trial (user + system, read from /proc/PID/stat): what a replay core can serve;
* for 2 servers, ``shards2_over_shards1``: the sum over servers of trials per replay
  CPU-second, over one server's trials per replay CPU-second — how many times one server's
  capacity two servers serve when each has a core of its own (this 2-core machine cannot
  give each a core while the consumer runs, so wall-clock throughput would not show it).

Prints medians over repeats, the ratios against the baseline, and a final one-line JSON summary
with ``us_per_trial_b256`` (this tree, dt-100 lengths, replay CPU), ``us_per_trial_b256_baseline``
and ``shards2_over_shards1`` (this tree, B 256, dt-100 lengths).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LENGTHS = {"dt100": (14, 41), "dt10": (140, 401)}
OBS, STATE, ACTIONS = 5, 768, 3


def requests_for(B: int, lengths: str) -> int:
    n = {32: 600, 256: 150, 1024: 40}.get(B, max(10, 16384 // B))
    return max(8, n // (4 if lengths == "dt10" else 1))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child(args) -> None:
    """One tree: every configuration once; prints one JSON line per configuration."""
    import numpy as np
    import ray
    import torch
    from mpn_dqn.common.codec import encode_trials
    from mpn_dqn.driver.runtime.ray_cluster import init_local_ray
    from mpn_dqn.replay.server import ReplayServer
    from tests.helpers import make_trial

    torch.set_num_threads(1)
    init_local_ray(num_cpus=2, logging_level="ERROR", log_to_driver=False)

    @ray.remote(num_cpus=0)
    class Consumer:
        """The learner's side: the tree's own replay client, one thread per replay server
        (one request in flight each, as the learner's prefetch), torch tensors out."""

        def run(self, handles: list, B: int, n: int, shared: bool) -> dict:
            import threading
            import torch
            from mpn_dqn.driver.runtime.ray_roles import RayReplayClient
            torch.set_num_threads(1)
            clients = [RayReplayClient(h, OBS, STATE) for h in handles]
            for c in clients:
                c.use_shared = shared            # (no such switch in trees before shared memory)
            per = [0] * len(clients)
            quota = -(-n // len(clients))

            def loop(i):
                for _ in range(quota):
                    b = clients[i].sample(B)
                    [torch.from_numpy(np.ascontiguousarray(getattr(b, k)))
                     for k in ("obs", "actions", "rewards", "mask", "init_state")]
                    per[i] += B

            for i in range(len(clients)):             # warm-up: first batches, segments
                clients[i].sample(B)
            threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(clients))]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            for c in clients:
                getattr(c, "close", lambda: None)()
            return {"wall": wall, "trials": sum(per), "per_shard": per}

    Server = ray.remote(num_cpus=0, max_concurrency=16)(ReplayServer)
    paths = ["shared", "object-store"] if hasattr(ReplayServer, "sample_into") else ["baseline"]
    consumer = Consumer.remote()
    rng = np.random.default_rng(0)
    for lengths in args.lengths:
        lo, hi = LENGTHS[lengths]
        cap = 2000 if lengths == "dt100" else 600
        for shards in (1, 2):
            servers = [Server.remote(cap, {"obs_dim": OBS, "state_size": STATE, "num_actions": ACTIONS,
                                           "max_burnin": 0}, samples_per_insert=1e9, min_size=1,
                                     batch_size=max(args.batches), error_buffer=1e15) for _ in range(shards)]
            for s in servers:
                for i in range(0, cap, 100):
                    msg = encode_trials([make_trial(rng, int(rng.integers(lo, hi)), OBS, STATE, ACTIONS)
                                         for _ in range(100)])
                    assert ray.get(s.insert.remote(msg, "bench", i))["status"] == "ok"
            pids = [ray.get(s.pid.remote()) for s in servers]
            for B, path in [(B, p) for B in args.batches for p in paths]:
                n = requests_for(B, lengths)
                cpu0 = [cpu_seconds(p) for p in pids]
                r = ray.get(consumer.run.remote(servers, B, n, path == "shared"))
                cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0)]
                print(json.dumps({"lengths": lengths, "batch": B, "shards": shards, "path": path,
                                  "us_per_trial": 1e6 * r["wall"] / r["trials"],
                                  "replay_cpu_us_per_trial": 1e6 * sum(cpu) / r["trials"],
                                  "per_shard_trials_per_cpu_s": [t / max(c, 1e-9) for t, c in zip(r["per_shard"], cpu)]}),
                      flush=True)
            for s in servers:
                ray.kill(s)
    ray.shutdown()


def run_tree(root: Path, args) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--batches", *map(str, args.batches),
           "--lengths", *args.lengths]
    # PYTHONPATH: the tree's own modules, also in Ray's worker processes (an editable install of
    # another checkout would otherwise win there)
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"child failed in {root}: {p.stderr[-3000:]}")
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-rev", required=False, help="git revision whose replay -> learner path is "
                    "the baseline (run in a temporary worktree)")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 256, 1024])
    ap.add_argument("--lengths", nargs="+", default=list(LENGTHS), choices=list(LENGTHS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, os.getcwd())
        return child(args)
    if not args.baseline_rev:
        ap.error("--baseline-rev is required: the revision to compare this tree against (e.g. HEAD~5)")
    wt = Path(tempfile.mkdtemp(prefix="bench-replay-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(wt), args.baseline_rev], cwd=ROOT,
                   check=True, capture_output=True)
    rev = subprocess.run(["git", "rev-parse", "--short", args.baseline_rev], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()
    runs: dict[str, list] = {"this": [], "baseline": []}
    try:
        for i in range(args.repeats):
            for which, root in (("baseline", wt), ("this", ROOT)):
                runs[which].append(run_tree(root, args))
                print(f"repeat {i + 1}/{args.repeats}: {which} done", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT, capture_output=True)

    def med(which, key, **where):
        vals = [r[key] for rep in runs[which] for r in rep if all(r[k] == v for k, v in where.items())]
        return statistics.median(vals)

    def capacity(which, **where):
        """Median over repeats of the summed trials per replay CPU-second."""
        vals = [sum(r["per_shard_trials_per_cpu_s"]) for rep in runs[which] for r in rep
                if all(r[k] == v for k, v in where.items())]
        return statistics.median(vals)

    rows = []
    print(f"\n{'lengths':7s} {'B':>5s} {'shards':>6s} {'path':>12s} | {'wall us/trial':>13s} {'base':>8s} | "
          f"{'replay CPU us/trial':>19s} {'base':>8s} {'ratio':>6s}")
    for lengths in args.lengths:
        for B in args.batches:
            for shards in (1, 2):
                for path in ("shared", "object-store"):
                    w = dict(lengths=lengths, batch=B, shards=shards)
                    row = {**w, "path": path, "us_per_trial": med("this", "us_per_trial", path=path, **w),
                           "us_per_trial_baseline": med("baseline", "us_per_trial", **w),
                           "replay_cpu_us": med("this", "replay_cpu_us_per_trial", path=path, **w),
                           "replay_cpu_us_baseline": med("baseline", "replay_cpu_us_per_trial", **w),
                           "trials_per_replay_cpu_s": capacity("this", path=path, **w)}
                    row["replay_cpu_ratio"] = row["replay_cpu_us_baseline"] / row["replay_cpu_us"]
                    rows.append(row)
                    print(f"{lengths:7s} {B:5d} {shards:6d} {path:>12s} | {row['us_per_trial']:13.2f} "
                          f"{row['us_per_trial_baseline']:8.2f} | {row['replay_cpu_us']:19.2f} "
                          f"{row['replay_cpu_us_baseline']:8.2f} {row['replay_cpu_ratio']:5.2f}x")

    def pick(shards):
        return next((r for r in rows if r["lengths"] == "dt100" and r["batch"] == 256 and r["shards"] == shards
                     and r["path"] == "shared"), None)
    one, two = pick(1), pick(2)
    summary = {"benchmark": "replay_delivery", "baseline_rev": rev, "repeats": args.repeats, "rows": rows}
    if one:
        summary.update(us_per_trial_b256=round(one["replay_cpu_us"], 2),
                       us_per_trial_b256_baseline=round(one["replay_cpu_us_baseline"], 2),
                       ratio_b256=round(one["replay_cpu_ratio"], 2),
                       wall_us_per_trial_b256=round(one["us_per_trial"], 2),
                       shards2_over_shards1=round(two["trials_per_replay_cpu_s"] / one["trials_per_replay_cpu_s"], 2))
        print(f"\nB 256, dt-100 lengths: {summary['us_per_trial_b256']} us of replay CPU per delivered trial vs "
              f"{summary['us_per_trial_b256_baseline']} at {rev} ({summary['ratio_b256']}x); 2 servers serve "
              f"{summary['shards2_over_shards1']}x one server's trials per replay CPU-second")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
