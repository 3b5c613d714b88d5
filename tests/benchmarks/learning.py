"""The evidence behind the defaults: runs the real CLI over ablation grids and writes
docs/defaults-evidence.md + docs/defaults-evidence.png (the results table itself comes from
``python main.py sweep``).

Every run is ``python main.py train-neurogym --env-name T [--dt D] [ablation options]`` with the
project's defaults otherwise; its accuracy is the greedy evaluation the run ends with
(``summary.json`` → ``final_eval``, ``--eval-trials`` trials, default 1000 here), reported as a
fraction of the ideal-observer ceiling.  Results accumulate in ``docs/defaults-evidence.jsonl`` (one line
per run), so the grid can be run in pieces and the report rebuilt from everything measured.

    python tests/benchmarks/learning.py main --seeds 0 1 2          # goal 1: 3 tasks x 3 seeds, defaults
    python tests/benchmarks/learning.py cores --seeds 0             # MPN vs GRU vs LSTM
    python tests/benchmarks/learning.py ablations --tasks DelayMatchSample-v0 --seeds 0   # 40000 trials each
    python tests/benchmarks/learning.py long --tasks PerceptualDecisionMaking-v0   # goal 2: dt 10
    python tests/benchmarks/learning.py other --tasks GoNogo-v0 DelayComparison-v0 --seeds 0
    python tests/benchmarks/learning.py report                      # rebuild docs/defaults-evidence.md
    python tests/benchmarks/learning.py record --group long --label "..." --dirs experiments/NAME  # a hand-made run

Last line: one JSON object summarising what this invocation ran.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mpn_dqn.common.tasks import ideal_accuracy, pct_of_ideal  # noqa: E402

TASKS = ["PerceptualDecisionMaking-v0", "ContextDecisionMaking-v0", "DelayMatchSample-v0"]
RESULTS = ROOT / "docs" / "defaults-evidence.jsonl"
# Which defaults a row was measured with.  The report's main tables use only rows of the current
# defaults; rows of earlier defaults stay in defaults-evidence.jsonl and are listed as superseded.
DEFAULTS = ("5: --n-step-cut non-greedy, task-time TD weighting, η/λ learned per 100 ms, "
            "M's time constant ≤ 3 s (a clamp on λ), η ≥ 0.1 per 100 ms (a clamp)")
EARLIER_DEFAULTS = "1: plain n-step returns, uniform TD weighting, η/λ learned per step"
SUPERSEDED = {
    EARLIER_DEFAULTS: "no n-step cut, uniform TD weighting, η/λ learned per step (at dt 100 only the "
                      "cut changes training; at dt 10 all three)",
    "2: --n-step-cut non-greedy, task-time TD weighting, η/λ learned per 100 ms":
        "M's time constant bounded at 10 s, not 3 s (--m-timescale-max-ms 10000: lambda ≤ 0.990 at "
        "dt 100, ≤ 0.999 at dt 10), the bound a scale (λ = λ_max·σ(θ))",
    "3: --n-step-cut non-greedy, task-time TD weighting, η/λ learned per 100 ms, M's time constant ≤ 3 s":
        "the bound a scale (λ = λ_max·σ(θ), so the tighter bound also slowed λ's learning where it "
        "did not bind), not a clamp",
    "4: --n-step-cut non-greedy, task-time TD weighting, η/λ learned per 100 ms, M's time constant ≤ 3 s "
    "(a clamp on λ)":
        "no floor on a learned η (it could fall to 0 and below); identical to version 5 wherever η "
        "stays above 0.1 per 100 ms (every dt-100 run of version 4: η ≥ 0.44)",
}
# Rows of an earlier version that count as measured with the current defaults, and why: the
# version-5 change (a floor of 0.1 per 100 ms on a learned η) is a clamp, so a run whose η never
# came near the floor computed exactly what version 5 computes. Checked per row from the η its
# metrics logged (every print_freq episodes); a margin of 2x covers the updates between two records.
ETA_FLOOR_V5 = 0.1      # --eta-min-per-100ms of version 5
CARRIED_OVER = {
    "4: --n-step-cut non-greedy, task-time TD weighting, η/λ learned per 100 ms, M's time constant ≤ 3 s "
    "(a clamp on λ)": lambda row: (row.get("eta_min_per_100ms_logged") or 0.0) >= 2 * ETA_FLOOR_V5,
}
RUNS_DIR = Path(os.environ.get("MPN_DQN_RUNS", "/tmp/mpn-dqn-learning"))

# ablation name -> list of (variant label, extra CLI options)
ABLATIONS = {
    "constant input": [("on (default)", []), ("off", ["--input-bias", "0"])],
    "replay init": [("stored (default)", []), ("zero", ["--replay-init", "zero"]),
                    ("burn-in", ["--replay-init", "burn-in"])],
    "n-step": [("5 (default)", []), ("1", ["--n-step", "1"])],
    "plasticity": [("learnable (default)", []), ("fixed", ["--no-learn-plasticity"])],
    "trials per episode": [("10 (default)", []), ("1", ["--trials-per-episode", "1"]),
                           ("50", ["--trials-per-episode", "50"])],
    "core": [("mpn (default)", []), ("gru", ["--core", "gru"]), ("lstm", ["--core", "lstm"])],
    "n-step cut": [("non-greedy (default)", []), ("none", ["--n-step-cut", "none"])],
    "envs per actor": [("16 (default)", []), ("8", ["--envs-per-actor", "8"])],
}


def run_one(group: str, task: str, seed: int, extra: list[str], label: str, dt: int = 100,
            budget_min: float | None = None, eval_trials: int = 1000, budget_trials: int | None = None) -> dict:
    slug = "".join(c if c.isalnum() else "-" for c in group)
    name = f"{slug}-{task.split('-')[0]}-dt{dt}-s{seed}-{zlib.crc32(repr((label, extra)).encode()) % 10**6}"
    cmd = [sys.executable, "main.py", "train-neurogym", "--env-name", task, "--dt", str(dt),
           "--seed", str(seed), "--experiments-dir", str(RUNS_DIR), "--experiment-name", name,
           "--overwrite", "--eval-trials", str(eval_trials), *extra]
    if budget_min is not None:
        cmd += ["--time-limit-minutes", str(budget_min), "--num-episodes", "10000000"]
    if budget_trials is not None:            # the same number of training trials for every variant
        tpe = int(extra[extra.index("--trials-per-episode") + 1]) if "--trials-per-episode" in extra else 10
        cmd += ["--num-episodes", str(max(1, budget_trials // tpe))]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    exp = RUNS_DIR / name
    row = {"group": group, "task": task, "dt": dt, "seed": seed, "label": label, "options": extra,
           "budget": f"{budget_min} min" if budget_min else (f"{budget_trials} trials" if budget_trials else None),
           "wall_s": round(wall, 1), "returncode": p.returncode}
    return _finish_row(row, exp, p.stderr)


def record_existing(group: str, exp: Path, label: str) -> dict:
    """A row for a run made by hand (``main.py train-neurogym ...``) from its experiment folder;
    the task, dt, seed and options come from its config.json, the wall time from summary.json."""
    cfg = json.loads((exp / "config.json").read_text())
    summary = json.loads((exp / "summary.json").read_text())
    row = {"group": group, "task": cfg["env_name"], "dt": cfg["dt"], "seed": cfg["seed"], "label": label,
           "options": [], "budget": None, "wall_s": round(summary.get("wall_time_s", 0.0), 1),
           "returncode": 0}
    return _finish_row(row, exp, "")


def _finish_row(row: dict, exp: Path, stderr: str) -> dict:
    row.update(experiment=str(exp), measured_at=time.strftime("%Y-%m-%d %H:%M"), defaults=DEFAULTS)
    group, task, dt, seed, label, wall = (row[k] for k in ("group", "task", "dt", "seed", "label", "wall_s"))
    try:
        summary = json.loads((exp / "summary.json").read_text())
        ev = summary.get("final_eval", {})
        row.update(accuracy=ev.get("accuracy"), pct_ideal=ev.get("pct_ideal"),
                   fix_break_rate=ev.get("fix_break_rate"), eval_trials=ev.get("trials"),
                   episodes=summary.get("episodes"), env_steps=summary.get("env_steps"),
                   updates=summary.get("updates"),
                   best_model_accuracy=summary.get("best_model_eval", {}).get("accuracy"),
                   selected_model=summary.get("selected_model", {}).get("checkpoint"),
                   selected_accuracy=summary.get("selected_model", {}).get("eval", {}).get("accuracy"))
        curve = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines() if line.strip()]
        row["curve"] = [[r.get("wall_time"), r.get("env_steps"), r.get("accuracy")] for r in curve]
        row.update(_eta_logged(curve, dt))
    except (OSError, json.JSONDecodeError) as exc:
        row["error"] = f"{exc}; stderr: {stderr[-500:]}"
    RESULTS.parent.mkdir(exist_ok=True)
    with open(RESULTS, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    acc = row.get("accuracy")
    print(f"[{group}] {task} dt={dt} seed={seed} {label}: accuracy {acc} "
          f"({row.get('pct_ideal') and round(row['pct_ideal'], 1)}% ideal) in {wall:.0f}s", flush=True)
    return row


def _eta_logged(records: list[dict], dt: int) -> dict:
    """The smallest η per 100 ms among the metrics records (learned or fixed; absent for the gated
    cores, which log none)."""
    etas = [r["eta"] * 100.0 / dt for r in records if r.get("eta") is not None]
    return {"eta_min_per_100ms_logged": round(min(etas), 4)} if etas else {}


def refresh_rows() -> int:
    """Re-read summary.json of every row whose experiment folder still exists and fill the
    model-selection fields it lacks (rows written by an older learning.py).  Returns how many."""
    rows = load_rows(current=None)
    n = 0
    for r in rows:
        exp = Path(r.get("experiment", ""))
        if ("selected_accuracy" in r and "eta_min_per_100ms_logged" in r) or not (exp / "summary.json").exists():
            continue
        summary = json.loads((exp / "summary.json").read_text())
        sel = summary.get("selected_model")
        same_run = (summary.get("updates"), summary.get("final_eval", {}).get("accuracy")) == \
            (r.get("updates"), r.get("accuracy"))    # the folder may hold a later re-run
        if sel and same_run and "selected_accuracy" not in r:
            r.update(selected_model=sel.get("checkpoint"), selected_accuracy=sel.get("eval", {}).get("accuracy"),
                     best_model_accuracy=summary.get("best_model_eval", {}).get("accuracy"))
            n += 1
        if same_run and "eta_min_per_100ms_logged" not in r and (exp / "metrics.jsonl").exists():
            records = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines() if line.strip()]
            r.update(_eta_logged(records, r["dt"]))
            n += 1
    if n:
        RESULTS.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return n


def load_rows(current: bool | None = True) -> list[dict]:
    """Rows of the current defaults (True), of earlier ones (False) or all (None)."""
    if not RESULTS.exists():
        return []
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    for r in rows:
        r.setdefault("defaults", EARLIER_DEFAULTS)
    return rows if current is None else [r for r in rows if is_current(r) == current]


def is_current(row: dict) -> bool:
    """Measured with the current defaults, or with an earlier version whose difference provably
    did not act in this run (``CARRIED_OVER``)."""
    carried = CARRIED_OVER.get(row["defaults"])
    return row["defaults"] == DEFAULTS or (carried is not None and carried(row))


def _stats(xs):
    import numpy as np
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None, 0
    return float(np.mean(xs)), (float(np.max(xs) - np.min(xs)) if len(xs) > 1 else 0.0), len(xs)


def write_report() -> None:
    rows = load_rows(current=True)
    for r in rows:          # carried-over rows say so (a display label only: not written back)
        if r["defaults"] != DEFAULTS:
            r["label"] += f" [version {r['defaults'][0]}, η never near the floor]"
    lines = ["# Evidence behind the defaults", "",
             "Greedy accuracy at the end of training (evaluation trials as listed), as a fraction of the",
             "ideal-observer ceiling. Produced by `python tests/benchmarks/learning.py` on a 2-core CPU",
             "machine; every row is a real run of `python main.py train-neurogym` with the defaults plus the",
             "options shown. Mean over runs (seeds as listed in defaults-evidence.jsonl), spread = max - min. Accuracy is that of the model the run",
             "hands over (`selected_model.pt`: the final model or best_model.pt, whichever was better on",
             "separate validation seeds) on the test seeds; the last two columns test both candidates",
             "(best_model.pt is chosen during training by the training accuracy, with exploration).", "",
             f"Defaults version {DEFAULTS}. Rows measured with earlier defaults are listed at the end.", ""]
    for group, title in (("main", "Goal 1: defaults, dt = 100, M kept across 10-trial episodes"),
                         ("long", "Goal 2: dt = 10 (long trials)"), ("cores", "Cores"),
                         ("other", "Goal 3: other NeuroGym tasks, same defaults (% of ideal only "
                                   "where a ceiling is known)"),
                         ("diagnostic", "Diagnostics: runs outside the goals' settings that test "
                                        "an explanation (recorded with `record --group diagnostic`)")):
        sel = [r for r in rows if r["group"] == group]
        if not sel:
            continue
        lines += [f"## {title}", "", "| task | dt | variant | runs | accuracy (mean) | spread | % of ideal | "
                  "fix-break rate | wall (s, mean) | final model | best_model.pt |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        keys = sorted({(r["task"], r["dt"], r["label"]) for r in sel})
        for task, dt, label in keys:
            rs = [r for r in sel if (r["task"], r["dt"], r["label"]) == (task, dt, label)]
            # the model the run hands over (selected on validation seeds), else the final one
            m, spread, n = _stats([r.get("selected_accuracy", r.get("accuracy")) for r in rs])
            fm, _, _ = _stats([r.get("accuracy") for r in rs])
            pct = pct_of_ideal(m, task, dt)
            pct = f"{pct:.1f}%" if pct is not None else ("chance is the ceiling" if ideal_accuracy(task, dt) else "-")
            fb, _, _ = _stats([r.get("fix_break_rate") for r in rs])
            wall, _, _ = _stats([r.get("wall_s") for r in rs])
            bm, _, bn = _stats([r.get("best_model_accuracy") for r in rs])
            best = f"{bm:.3f} ({bn})" if bm is not None else "-"
            lines.append(f"| {task} | {dt} | {label} | {n} | {m:.3f} | {spread:.3f} | {pct} | "
                         f"{fb:.2f} | {wall:.0f} | {fm:.3f} | {best} |" if m is not None else
                         f"| {task} | {dt} | {label} | 0 | failed | | | | | | |")
        lines.append("")
    abl = [r for r in rows if r["group"].startswith("ablation:")]
    if abl:
        lines += ["## Ablations (each at a fixed budget)", ""]
        for task in sorted({r["task"] for r in abl}):
            ref = [r.get("accuracy") for r in abl if r["task"] == task and "(default)" in r["label"]
                   and r.get("accuracy") is not None]
            if len(ref) > 1:
                lines += [f"Noise floor: the default configuration on {task} was run {len(ref)} times "
                          f"(once per ablation and seed): mean {sum(ref) / len(ref):.3f}, min {min(ref):.3f}, "
                          f"max {max(ref):.3f}. Differences smaller than that spread are not evidence.", ""]
        lines += [
                  "| ablation | task | variant | seeds | accuracy | % of ideal | budget |", "|---|---|---|---|---|---|---|"]
        for key in sorted({(r["group"], r["task"], r["label"]) for r in abl}):
            rs = [r for r in abl if (r["group"], r["task"], r["label"]) == key]
            m, _, n = _stats([r.get("accuracy") for r in rs])
            ideal = ideal_accuracy(key[1], 100)
            pct = f"{100 * m / ideal:.1f}%" if (m is not None and ideal) else "-"
            budget = rs[0].get("budget")
            lines.append(f"| {key[0].split(':', 1)[1]} | {key[1]} | {key[2]} | {n} | "
                         f"{m:.3f} | {pct} | {budget} |" if m is not None else
                         f"| {key[0].split(':', 1)[1]} | {key[1]} | {key[2]} | 0 | failed | | |")
        lines.append("")
    old = load_rows(current=False)
    if old:
        lines += ["## Superseded: measured with earlier defaults", ""]
        for version, differs in SUPERSEDED.items():
            lines += [f"- version {version} — differs: {differs}"]
        lines += ["", "Accuracy of the handed-over model where the run recorded one, else of the final model.",
                  "", "| version | group | task | dt | variant | runs | accuracy (mean) | % of ideal |",
                  "|---|---|---|---|---|---|---|---|"]
        for key in sorted({(r["defaults"][0], r["group"], r["task"], r["dt"], r["label"]) for r in old}):
            rs = [r for r in old if (r["defaults"][0], r["group"], r["task"], r["dt"], r["label"]) == key]
            m, _, n = _stats([r.get("selected_accuracy", r.get("accuracy")) for r in rs])
            ideal = ideal_accuracy(key[2], key[3])
            pct = f"{100 * m / ideal:.1f}%" if (m is not None and ideal) else "-"
            lines.append(f"| {' | '.join(map(str, key))} | {n} | "
                         + (f"{m:.3f} | {pct} |" if m is not None else "failed | |"))
        lines.append("")
    out = ROOT / "docs" / "defaults-evidence.md"
    out.write_text("\n".join(lines) + "\n")
    _plot(rows)
    print(f"wrote {out}")


def _plot(rows) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sel = [r for r in rows if r["group"] in ("main", "long") and r.get("curve")]
    tasks = sorted({(r["task"], r["dt"]) for r in sel})
    if not tasks:
        return
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), squeeze=False)
    for j, (task, dt) in enumerate(tasks):
        ideal = ideal_accuracy(task, dt)
        for r in [r for r in sel if (r["task"], r["dt"]) == (task, dt)]:
            c = [p for p in r["curve"] if p[2] is not None]
            lab = f"seed {r['seed']}" + (f" ({r['label'].split('--num-episodes')[1].strip()} episodes)"
                                         if "--num-episodes" in r["label"] else "")
            axes[0, j].plot([p[0] for p in c], [p[2] for p in c], lw=1, label=lab)
            axes[1, j].plot([p[1] for p in c], [p[2] for p in c], lw=1, label=lab)
        for i, xl in enumerate(("wall time (s)", "env steps")):
            ax = axes[i, j]
            if ideal:
                ax.axhline(ideal, color="g", ls="--", lw=1, label="ideal observer")
                ax.axhline(0.95 * ideal, color="g", ls=":", lw=1, label="95% of ideal")
            ax.axhline(0.5, color="gray", ls=":", lw=1)
            ax.set_ylim(0.3, 1.02)
            ax.set_xlabel(xl)
            ax.set_ylabel("training-trial accuracy")
            ax.set_title(f"{task} dt={dt}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "defaults-evidence.png", dpi=80)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", choices=["main", "cores", "ablations", "long", "other", "report", "record"])
    ap.add_argument("--group", help="record: the group a hand-made run belongs to (e.g. long; "
                    "diagnostic: a run outside the goals' settings that tests an explanation)")
    ap.add_argument("--dirs", nargs="+", default=[], help="record: experiment folders of hand-made runs")
    ap.add_argument("--label", default="defaults", help="record: the variant label")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budget-min", type=float, default=None,
                    help="wall-clock budget per ablation run (default: a budget in trials instead)")
    ap.add_argument("--budget-trials", type=int, default=40_000,
                    help="training trials per ablation run (used unless --budget-min is given)")
    ap.add_argument("--ablations", nargs="+", default=list(ABLATIONS), help="which ablations")
    ap.add_argument("--eval-trials", type=int, default=1000)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra CLI options for every run")
    args = ap.parse_args()

    def with_extra(label: str) -> str:      # rows with extra options never pass for the defaults
        if not args.extra:
            return label
        return f"{label}{' ' if ' + ' in label else ' + '}{' '.join(args.extra)}"

    ran = []
    if args.grid == "report":
        print(f"refreshed {refresh_rows()} rows from their experiments' summary.json")
    if args.grid == "record":
        if not args.group or not args.dirs:
            ap.error("record needs --group and --dirs")
        for d in args.dirs:
            ran.append(record_existing(args.group, Path(d), args.label))
    elif args.grid == "main":
        for task in args.tasks:
            for seed in args.seeds:
                ran.append(run_one("main", task, seed, list(args.extra), with_extra("defaults"),
                                   eval_trials=args.eval_trials))
    elif args.grid == "other":
        for task in args.tasks:
            for seed in args.seeds:
                ran.append(run_one("other", task, seed, list(args.extra), with_extra("defaults"),
                                   eval_trials=args.eval_trials))
    elif args.grid == "cores":
        for task in args.tasks:
            for seed in args.seeds:
                for core in ("mpn", "gru", "lstm"):
                    ran.append(run_one("cores", task, seed, ["--core", core, *args.extra], with_extra(core),
                                       eval_trials=args.eval_trials))
    elif args.grid == "long":
        for task in args.tasks:
            for seed in args.seeds:
                ran.append(run_one("long", task, seed, ["--bptt-chunk-size", "40", *args.extra],
                                   with_extra("defaults + --bptt-chunk-size 40"), dt=10,
                                   eval_trials=args.eval_trials))
    elif args.grid == "ablations":
        for name in args.ablations:
            for label, opts in ABLATIONS[name]:
                for task in args.tasks:
                    for seed in args.seeds:
                        ran.append(run_one(f"ablation:{name}", task, seed, [*opts, *args.extra], with_extra(label),
                                           budget_min=args.budget_min, eval_trials=args.eval_trials,
                                           budget_trials=None if args.budget_min else args.budget_trials))
    write_report()
    accs = [r.get("pct_ideal") for r in ran if r.get("pct_ideal") is not None]
    print(json.dumps({"benchmark": "learning", "grid": args.grid, "runs": len(ran),
                      "mean_pct_ideal": (sum(accs) / len(accs)) if accs else None,
                      "min_pct_ideal": min(accs) if accs else None}))


if __name__ == "__main__":
    main()
