"""End-to-end benchmark: the real Ray system on this machine for a fixed wall time.

For each configuration it runs ``python main.py train-neurogym`` (embedded Ray, real NeuroGym,
real actors / replay server / learner) with ``--time-limit-minutes`` and reads its
metrics.jsonl: env steps/s generated, trial-steps/s trained, the samples-per-insert ratio
actually held against the configured one, the learner's idle fraction and the policy lag.
The first ``--warmup-s`` seconds (Ray start, learning_starts) are excluded.  The old
single-process trainer's ~192 env steps/s is the reference it is compared to (it was measured
on the old code, which is not part of this project).

    python tests/benchmarks/bench_system.py [--seconds 60] [--actors 1 2] [--replay-ratio 4]
    python tests/benchmarks/bench_system.py --scaling      # actors 1 vs 2 with a light learner
    python tests/benchmarks/bench_system.py --baseline-rev HEAD~1 --actors 0 1 --repeats 3
        # this tree against another commit (a temporary git worktree), runs alternating,
        # medians and the ratio this / baseline per actor count

Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OLD_TRAINER_ENV_STEPS_PER_S = 192.0


def run(actors: int, seconds: float, replay_ratio: float, env_name: str, warmup_s: float,
        extra: list[str], root: Path = ROOT) -> dict:
    tmp = tempfile.mkdtemp(prefix="bench-system-")
    cmd = [sys.executable, "main.py", "train-neurogym", "--env-name", env_name, "--num-actors", str(actors),
           "--num-episodes", "100000000", "--time-limit-minutes", str(seconds / 60), "--print-freq", "50",
           "--eval-trials", "0", "--replay-ratio", str(replay_ratio), "--experiments-dir", tmp,
           "--experiment-name", "bench", *extra]
    # PYTHONPATH: the tree's own modules, also in Ray's worker processes (an editable install
    # of another checkout would otherwise win there)
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"run failed: {p.stderr[-2000:]}")
    recs = [json.loads(line) for line in open(os.path.join(tmp, "bench", "metrics.jsonl"))]
    t0 = recs[0]["wall_time"] if recs else 0
    steady = [r for r in recs if r["wall_time"] - t0 >= warmup_s] or recs
    first, last = steady[0], steady[-1]
    span = max(1e-9, last["wall_time"] - first["wall_time"])
    med = lambda k: statistics.median([r[k] for r in steady if r.get(k) is not None] or [float("nan")])  # noqa: E731
    out = {
        "actors": actors, "replay_ratio_configured": replay_ratio, "seconds": round(span, 1),
        "env_steps_per_s": (last["env_steps"] - first["env_steps"]) / span,
        "updates_per_s": (last["updates"] - first["updates"]) / span,
        "trial_steps_trained_per_s": med("trial_steps_trained_per_s"),
        "replay_ratio_achieved": med("samples_per_insert"),
        "learner_idle_frac": med("learner_idle_frac"),
        "policy_lag": med("policy_lag"),
        "accuracy_last": last.get("accuracy"),
    }
    cpu = (last.get("actor_cpu_s") or 0.0) - (first.get("actor_cpu_s") or 0.0)
    # env steps per CPU-second the actors actually got: flat in the actor count means no shared
    # bottleneck (replay, driver) slows an actor down; the total then grows with the cores given
    out["actor_cpu_cores"] = cpu / span
    out["env_steps_per_actor_cpu_s"] = (last["env_steps"] - first["env_steps"]) / cpu if cpu > 0 else None
    out["vs_old_trainer"] = out["env_steps_per_s"] / OLD_TRAINER_ENV_STEPS_PER_S
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--warmup-s", type=float, default=10)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--replay-ratio", type=float, default=4.0)
    ap.add_argument("--env-name", default="ContextDecisionMaking-v0")
    ap.add_argument("--scaling", action="store_true",
                    help="measure actor scaling 1 -> 2 with a light learner (replay ratio 0.1)")
    ap.add_argument("--baseline-rev", default=None,
                    help="also run a git revision (checked out in a temporary worktree) and print "
                         "the ratio of this tree's env steps/s to it, per actor count")
    ap.add_argument("--repeats", type=int, default=1, help="runs per configuration (medians)")
    args, extra = ap.parse_known_args()
    rr = 0.1 if args.scaling else args.replay_ratio
    if args.baseline_rev:
        return compare(args, rr, extra)
    results = []
    for n in args.actors:
        r = run(n, args.seconds, rr, args.env_name, args.warmup_s, extra)
        results.append(r)
        print(f"{n} actor(s): {r['env_steps_per_s']:8.0f} env steps/s ({r['vs_old_trainer']:.0f}x the old "
              f"trainer's 192) | {r['trial_steps_trained_per_s']:8.0f} trial-steps/s trained | "
              f"{r['updates_per_s']:.1f} upd/s | replay ratio {r['replay_ratio_achieved']:.2f} of "
              f"{rr} configured | learner idle {r['learner_idle_frac']:.2f} | policy lag {r['policy_lag']:.1f} | "
              f"actors used {r['actor_cpu_cores']:.2f} cores, {r['env_steps_per_actor_cpu_s'] or 0:.0f} env steps "
              f"per actor CPU-second", flush=True)
    summary = {"benchmark": "system", "env_name": args.env_name, "mode": "scaling" if args.scaling else "pace",
               "results": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in results]}
    if len(results) >= 2:
        base = results[0]["env_steps_per_s"] / results[0]["actors"]
        summary["scaling_efficiency"] = round(results[-1]["env_steps_per_s"] / (base * results[-1]["actors"]), 3)
        print(f"scaling efficiency {results[0]['actors']}->{results[-1]['actors']} actors: "
              f"{summary['scaling_efficiency']:.2f} of linear")
        per_cpu = [r["env_steps_per_actor_cpu_s"] for r in (results[0], results[-1])]
        if all(per_cpu):
            summary["per_actor_cpu_efficiency"] = round(per_cpu[1] / per_cpu[0], 3)
            print(f"env steps per actor CPU-second {results[0]['actors']}->{results[-1]['actors']} actors: "
                  f"{summary['per_actor_cpu_efficiency']:.2f} (1.0: an added core's worth of actor "
                  f"time yields as much as the first)")
    print(json.dumps(summary))


def compare(args, rr: float, extra: list[str]) -> None:
    """This tree against ``--baseline-rev``: alternating runs, medians, ratios."""
    wt = Path(tempfile.mkdtemp(prefix="bench-baseline-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(wt), args.baseline_rev], cwd=ROOT,
                   check=True, capture_output=True)
    rev = subprocess.run(["git", "rev-parse", "--short", args.baseline_rev], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()
    try:
        rows = []
        for n in args.actors:
            got = {"this": [], "baseline": []}
            for _ in range(args.repeats):
                for which, root in (("baseline", wt), ("this", ROOT)):
                    r = run(n, args.seconds, rr, args.env_name, args.warmup_s, extra, root)
                    got[which].append(r)
                    print(f"{n} actor(s) {which:8s}: {r['env_steps_per_s']:8.0f} env steps/s, "
                          f"{r['updates_per_s']:.1f} upd/s, replay ratio {r['replay_ratio_achieved']:.2f}",
                          flush=True)
            med = {w: {k: statistics.median([r[k] for r in rs]) for k in ("env_steps_per_s", "updates_per_s")}
                   for w, rs in got.items()}
            ratio = med["this"]["env_steps_per_s"] / med["baseline"]["env_steps_per_s"]
            upd = med["this"]["updates_per_s"] / max(1e-9, med["baseline"]["updates_per_s"])
            print(f"{n} actor(s): median env steps/s {med['this']['env_steps_per_s']:.0f} vs "
                  f"{med['baseline']['env_steps_per_s']:.0f} at {rev}: ratio {ratio:.2f}; updates/s ratio "
                  f"{upd:.2f}", flush=True)
            rows.append({"actors": n, "env_steps_per_s": round(med["this"]["env_steps_per_s"], 1),
                         "env_steps_per_s_baseline": round(med["baseline"]["env_steps_per_s"], 1),
                         "ratio": round(ratio, 3), "updates_per_s_ratio": round(upd, 3)})
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT, capture_output=True)
    print(json.dumps({"benchmark": "system", "mode": "compare", "env_name": args.env_name,
                      "baseline_rev": rev, "repeats": args.repeats, "seconds": args.seconds,
                      "results": rows}))


if __name__ == "__main__":
    main()
