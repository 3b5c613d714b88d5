"""Results of many trainings: one row per finished experiment, merged into a table.

A row is read from an experiment directory (``config.json``, ``summary.json``,
``metrics.jsonl``) and holds what a results table needs: the task, core, seed and the options
that made the run differ from the defaults (its *variant*), the greedy accuracy of the model the
run hands over (``selected_model.pt`` on the test seeds) with its standard error, % of the
task's ceiling, the best trivial policy, fixation breaks and premature responses, the time
and env steps to 95 % of the ceiling (first metrics record whose training-trial accuracy
reaches it), env steps, wall time, the git commit, the full config and the learning curve.

A row's variant is computed from its stored config against the defaults of the code that
writes the report (:func:`variant_of`): a run made before a default changed reads as the
options it differs in today, and one whose options equal today's defaults reads ``defaults``
whatever it was called when it ran.  ``results.json`` holds rows; ``write_report`` merges new
rows into it (a row replaces an older one of the same task, dt, core, seed and variant) and
writes ``results.md`` (the battery at the defaults with the MPN and GRU side by side, then every
task, core and variant in detail) and ``learning_curves.png`` (per task, each core and variant:
mean over seeds with a min-max band, the defaults drawn boldly) from everything it holds.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import time
import warnings
from pathlib import Path

ROW_KEY = ("task", "dt", "core", "seed", "variant")
PCT_GOAL = 95.0
CURVE_POINTS = 200          # a stored learning curve keeps about this many points

# Options that change neither what a run learns nor how it is scored: where it runs and writes,
# and how often it reports (the task, dt, core and seed are columns of their own).
_NOT_A_VARIANT = {"env_name", "dt", "core", "seed", "experiment_name", "experiments_dir",
                  "overwrite", "print_freq", "record_seconds", "checkpoint_freq",
                  "checkpoint_minutes", "plot_training", "address", "staleness_every"}


def _flag(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {'none' if value is None else value}"


def variant_of(row: dict) -> str:
    """The options of the row's run that differ from today's defaults, as ``train-neurogym``
    flags in the schema's order (a dt other than the task's own first), or ``defaults``.  A
    key the run's config lacks (the option did not exist yet) counts as what the run did
    (``common.config.ABSENT_KEY_VALUES``, else today's default); ``--num-actors`` counts
    against the default of the machine the row ran on.  Rows without a config keep their
    ``variant``."""
    cfg = row.get("config")
    if not isinstance(cfg, dict):
        return row.get("variant", "defaults")
    from dataclasses import fields
    from mpn_dqn.common.config import ABSENT_KEY_VALUES, TrainConfig
    from mpn_dqn.common.tasks import TaskError, UnknownTaskError, native_dt
    parts = []
    try:
        if cfg.get("dt") != native_dt(cfg["env_name"]):
            parts.append(_flag("dt", cfg.get("dt")))
    except (KeyError, TaskError, UnknownTaskError):
        pass
    for f in fields(TrainConfig):
        if f.name in _NOT_A_VARIANT:
            continue
        value = cfg.get(f.name, ABSENT_KEY_VALUES.get(f.name, f.default))
        default = f.default
        if f.name == "num_actors":                 # the default is one per CPU left after the learner
            cpus = (row.get("machine") or {}).get("cpus")
            default = max(1, cpus - 1) if cpus else (value if value else 1)
        if value != default:
            parts.append(_flag(f.name, value))
    return " ".join(parts) or "defaults"


def thin_curve(curve: list, n: int = CURVE_POINTS) -> list:
    """About ``n`` evenly spaced points of ``curve`` ([wall_time, env_steps, accuracy] rows),
    plus every point that raises the best accuracy so far, so the first time the curve reaches
    any accuracy (time to 95 % of any ceiling) is the same as on the whole curve.  A curve
    already thinned comes back as it is."""
    best, records = -math.inf, []
    for i, p in enumerate(curve):
        if p[2] is not None and p[2] > best:
            best = p[2]
            records.append(i)
    if len(curve) <= n + len(records):
        return list(curve)
    step = (len(curve) - 1) / (n - 1)
    return [curve[i] for i in sorted({round(i * step) for i in range(n)} | set(records))]


def git_commit(root: str | os.PathLike | None = None) -> str:
    """Short commit of the code that runs, ``+dirty`` when its code (Python files, pyproject.toml)
    has uncommitted changes; results files written into the tree do not count."""
    root = root or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "*.py",
                                "pyproject.toml"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def _machine_of(exp_dir: Path) -> dict:
    try:
        return json.loads((exp_dir / "machine.json").read_text())
    except (OSError, json.JSONDecodeError):
        from mpn_dqn.driver.experiment import machine
        return machine()


def time_to_pct(records: list[dict], ceiling: float | None, pct: float = PCT_GOAL) -> dict:
    """Wall time and env steps of the first record whose accuracy reaches ``pct`` % of ``ceiling``."""
    if not ceiling:
        return {"time_to_95_s": None, "env_steps_to_95": None}
    for r in records:
        acc = r.get("accuracy")
        if acc is not None and acc >= pct / 100.0 * ceiling:
            return {"time_to_95_s": r.get("wall_time"), "env_steps_to_95": r.get("env_steps")}
    return {"time_to_95_s": None, "env_steps_to_95": None}


def row_from_experiment(exp_dir: str | os.PathLike, *, variant: str = "defaults", commit: str | None = None,
                        extra: dict | None = None) -> dict:
    """One results row from a finished (or failed) experiment directory."""
    exp_dir = Path(exp_dir)
    cfg = json.loads((exp_dir / "config.json").read_text())
    row = {"task": cfg["env_name"], "dt": cfg["dt"], "core": cfg["core"], "seed": cfg["seed"],
           "variant": variant, "experiment": str(exp_dir), "commit": commit or git_commit(),
           "measured_at": time.strftime("%Y-%m-%d %H:%M"), "machine": _machine_of(exp_dir), "config": cfg}
    row.update(extra or {})
    summary_path = exp_dir / "summary.json"
    if not summary_path.exists():
        row["status"] = "no summary.json (the run did not finish)"
        return row
    summary = json.loads(summary_path.read_text())
    ev = summary.get("selected_model", {}).get("eval") or summary.get("final_eval")
    row.update(episodes=summary.get("episodes"), env_steps=summary.get("env_steps"),
               updates=summary.get("updates"), wall_s=summary.get("wall_time_s"),
               interrupted=summary.get("interrupted", False),
               selected_model=summary.get("selected_model", {}).get("checkpoint"))
    if not ev:
        row["status"] = "no evaluation (--eval-trials 0 or the run was interrupted)"
        return row
    acc = ev["accuracy"]
    n = ev["trials"]
    row.update(status="ok", accuracy=acc,
               accuracy_stderr=ev.get("accuracy_stderr", math.sqrt(acc * (1 - acc) / max(n, 1))),
               eval_trials=n, ceiling=ev.get("ceiling"), ceiling_source=ev.get("ceiling_source"),
               pct_ceiling=ev.get("pct_ceiling"),
               best_trivial=(ev.get("best_trivial") or {}).get("accuracy"),
               best_trivial_policy=(ev.get("best_trivial") or {}).get("policy"),
               fix_break_rate=ev.get("fix_break_rate"), premature_rate=ev.get("premature_rate"),
               final_model_accuracy=(summary.get("final_eval") or {}).get("accuracy"))
    from mpn_dqn.driver.experiment import read_jsonl
    records = read_jsonl(exp_dir / "metrics.jsonl")
    row.update(time_to_pct(records, row["ceiling"] if row["pct_ceiling"] is not None else None))
    row["curve"] = [[r.get("wall_time"), r.get("env_steps"), r.get("accuracy")] for r in records
                    if r.get("accuracy") is not None]           # thinned where results.json is written
    return row


# -- the table -------------------------------------------------------------------------------------

def load_rows(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path} is not a results file (a JSON object with a 'rows' list)")
    return data["rows"]


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` then ``new``, each row relabelled with its variant against today's defaults and
    replacing an earlier row of the same key (task, dt, core, seed, variant) in place."""
    index: dict[tuple, int] = {}
    out: list[dict] = []
    for r in [*old, *new]:
        r = dict(r, variant=variant_of(r))
        k = tuple(r.get(k) for k in ROW_KEY)
        if k in index:
            out[index[k]] = r
        else:
            index[k] = len(out)
            out.append(r)
    return out


def _fmt(x, spec=".3f", none="-"):
    return none if x is None else format(x, spec)


def current_ceilings(rows: list[dict]) -> dict:
    """The ceiling of each (task, dt) as ``python main.py ceiling`` measures it now (cached)."""
    from mpn_dqn.common.ceiling import ceiling_for
    return {(t, dt): ceiling_for(t, dt) for t, dt in sorted({(r["task"], r["dt"]) for r in rows})}


def summarize(rows: list[dict], ceilings: dict | None = None) -> list[dict]:
    """One line per (task, dt, core, variant): statistics over its seeds.  With ``ceilings``
    ({(task, dt): ceiling_for(...)}) % of ceiling uses them, else each row's own."""
    from mpn_dqn.common.ceiling import learnable, pct_of_ceiling
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["dt"], r["core"], r["variant"]), []).append(r)
    out = []
    for (task, dt, core, variant), rs in sorted(groups.items()):
        ok = [r for r in rs if r.get("status") == "ok"]
        accs = [r["accuracy"] for r in ok]
        ceil = (ceilings or {}).get((task, dt))
        if ceil is not None:
            pcts = [pct_of_ceiling(r["accuracy"], ceil) for r in ok] if learnable(ceil) else []
        else:
            pcts = [r["pct_ceiling"] for r in ok if r.get("pct_ceiling") is not None]
        if ceil is not None and learnable(ceil):      # against the current ceiling, from the curve
            t95 = [time_to_pct([{"wall_time": w, "env_steps": e, "accuracy": a} for w, e, a in r.get("curve") or []],
                               ceil["ceiling"])["time_to_95_s"] for r in ok]
            t95 = [t for t in t95 if t is not None]
        else:
            t95 = [r["time_to_95_s"] for r in ok if r.get("time_to_95_s") is not None]

        def mean(key):
            xs = [r[key] for r in ok if r.get(key) is not None]
            return statistics.fmean(xs) if xs else None
        out.append({
            "task": task, "dt": dt, "core": core, "variant": variant,
            "seeds": sorted(r["seed"] for r in ok), "failed": len(rs) - len(ok),
            "accuracy": statistics.fmean(accs) if accs else None,
            "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else None,
            "pct_ceiling": statistics.fmean(pcts) if pcts else None,
            "pct_ceiling_min": min(pcts) if pcts else None,
            "ceiling": ceil["ceiling"] if ceil is not None else (ok[0].get("ceiling") if ok else None),
            "learnable": bool(pcts) or not ok,
            "best_trivial": mean("best_trivial"), "fix_break_rate": mean("fix_break_rate"),
            "premature_rate": mean("premature_rate"),
            "time_to_95_s": statistics.median(t95) if t95 else None, "reached_95": len(t95),
            "env_steps": mean("env_steps"), "wall_s": mean("wall_s"),
            "commits": sorted({r.get("commit", "unknown") for r in rs}),
        })
    return out


def markdown(rows: list[dict], *, title: str = "Results", commands: list[str] = (),
             ceilings: dict | None = None) -> str:
    lines = [f"# {title}", ""]
    lines += ["Accuracy is that of the model each run hands over (`selected_model.pt`) on "
              f"{_eval_trials(rows)} greedy test trials, mean ± standard deviation over seeds; % of "
              "ceiling is against the ideal observer where one is known, else the ground-truth "
              "oracle (`python main.py ceiling`, as it measures the task now), and reads \"not learnable "
              "as registered\" where the ceiling does not beat the best trivial policy. A run's variant "
              "is the options in which it differs from today's defaults (`defaults`: none), whatever "
              "the defaults were when it ran; the commit column says which code ran. Time to 95 % is "
              "the median over the seeds that reached it of the wall time at which the training-trial "
              "accuracy (with exploration) first reached 95 % of the ceiling. Fixation breaks and "
              "premature responses are fractions of test trials.", ""]
    if commands:
        lines += ["Produced by:", ""] + [f"    {c}" for c in commands] + [""]
    machines = sorted({(m.get("cpus"), m.get("cpu"), m.get("gpu")) for m in
                       (r.get("machine") or {} for r in rows) if m}, key=str)
    if machines:
        lines += ["Measured on: " + "; ".join(f"{c} CPUs ({name})" + (f", GPU {g}" if g else ", no GPU")
                                              for c, name, g in machines) + " (each row's `machine` "
                  "in results.json).", ""]
    summary = summarize(rows, ceilings)
    defaults = [s for s in summary if s["variant"] == "defaults"]
    lines += _battery(defaults, ceilings or {})
    lines += ["## At the defaults, every core", ""] + _detail(defaults) + [""]
    others = [s for s in summary if s["variant"] != "defaults"]
    if others:
        lines += ["## Other variants", "", "Screens and ablations: each run's options beyond today's "
                  "defaults.", ""] + _detail(others)
    return "\n".join(lines) + "\n"


def _acc_cell(s: dict | None) -> str:
    if s is None:
        return "not run"
    if s["accuracy"] is None:
        return f"failed ({s['failed']})"
    sd = f" ± {s['accuracy_sd']:.3f}" if s["accuracy_sd"] is not None else ""
    return f"{s['accuracy']:.3f}{sd} ({len(s['seeds'])})"


def _pct_cell(s: dict | None) -> str:
    if s is None or s["accuracy"] is None:
        return "-"
    if not s["learnable"]:
        return "not learnable as registered"
    return "-" if s["pct_ceiling"] is None else f"{s['pct_ceiling']:.1f} %, {s['pct_ceiling_min']:.1f} %"


def _battery(defaults: list[dict], ceilings: dict) -> list[str]:
    """One line per battery task (and any other task run at the defaults): MPN and GRU side by side."""
    from mpn_dqn.common.tasks import BATTERY
    by = {(s["task"], s["core"]): s for s in defaults}
    tasks = list(BATTERY) + sorted({s["task"] for s in defaults} - set(BATTERY))
    lines = ["## The battery at the defaults", "",
             "| task | dt | ceiling | best trivial | MPN accuracy (seeds) | MPN % of ceiling (mean, min) | "
             "MPN fix breaks | MPN premature | MPN time to 95 % (s) | GRU accuracy (seeds) | "
             "GRU % of ceiling (mean, min) | commits |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tally = {c: [0, 0, 0] for c in ("mpn", "gru")}      # learnable tasks run, at >= 95 % on every seed, of those 3+ seeds
    for task in tasks:
        mpn, gru = by.get((task, "mpn")), by.get((task, "gru"))
        run = [s for s in (mpn, gru) if s is not None]
        dt = run[0]["dt"] if run else None
        ceil = ceilings.get((task, dt))
        ceiling = ceil["ceiling"] if ceil else (run[0]["ceiling"] if run else None)
        trivial = ceil["best_trivial"]["accuracy"] if ceil else (run[0]["best_trivial"] if run else None)
        for core, s in (("mpn", mpn), ("gru", gru)):
            if s is not None and s["accuracy"] is not None and s["learnable"] and s["pct_ceiling_min"] is not None:
                tally[core][0] += 1
                if s["pct_ceiling_min"] >= PCT_GOAL:
                    tally[core][1] += 1
                    tally[core][2] += len(s["seeds"]) >= 3
        t95 = ("-" if mpn is None else f"{mpn['time_to_95_s']:.0f} ({mpn['reached_95']}/{len(mpn['seeds'])})"
               if mpn["time_to_95_s"] is not None else f"- (0/{len(mpn['seeds'])})")
        commits = " ".join(sorted({c for s in run for c in s["commits"]}))
        lines.append(f"| {task.removesuffix('-v0')} | {dt or '-'} | {_fmt(ceiling)} | {_fmt(trivial)} | "
                     f"{_acc_cell(mpn)} | {_pct_cell(mpn)} | {_fmt(mpn and mpn['fix_break_rate'], '.2f')} | "
                     f"{_fmt(mpn and mpn['premature_rate'], '.2f')} | {t95} | {_acc_cell(gru)} | "
                     f"{_pct_cell(gru)} | {commits or '-'} |")
    said = "; ".join(f"{core.upper()} at ≥ {PCT_GOAL:.0f} % of the ceiling on every seed on {n95} of the "
                     f"{n} learnable tasks it ran ({n3} of them with 3 or more seeds)" if n else
                     f"{core.upper()}: no learnable task run at the defaults"
                     for core, (n, n95, n3) in tally.items())
    return lines + ["", said + ".", ""]


def _detail(summary: list[dict]) -> list[str]:
    lines = ["| task | dt | core | variant | seeds | accuracy | % of ceiling (mean, min) | ceiling | "
             "best trivial | fix breaks | premature | time to 95 % (s) | env steps | wall (s) | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        acc = "failed" if s["accuracy"] is None else (
            _fmt(s["accuracy"]) + (f" ± {s['accuracy_sd']:.3f}" if s["accuracy_sd"] is not None else ""))
        t95 = (f"{s['time_to_95_s']:.0f} ({s['reached_95']}/{len(s['seeds'])})"
               if s["time_to_95_s"] is not None else f"- (0/{len(s['seeds'])})")
        seeds = " ".join(map(str, s["seeds"])) + (f" (+{s['failed']} failed)" if s["failed"] else "")
        lines.append(f"| {s['task'].removesuffix('-v0')} | {s['dt']} | {s['core']} | {s['variant']} | {seeds} | "
                     f"{acc} | {_pct_cell(s)} | {_fmt(s['ceiling'])} | "
                     f"{_fmt(s['best_trivial'])} | {_fmt(s['fix_break_rate'], '.2f')} | "
                     f"{_fmt(s['premature_rate'], '.2f')} | {t95} | {_fmt(s['env_steps'], '.3g')} | "
                     f"{_fmt(s['wall_s'], '.0f')} | {' '.join(s['commits'])} |")
    return lines


def _eval_trials(rows: list[dict]) -> str:
    ns = sorted({r["eval_trials"] for r in rows if r.get("eval_trials")})
    return "/".join(map(str, ns)) if ns else "the"


def plot_curves(rows: list[dict], path: str | os.PathLike, ceilings: dict | None = None) -> Path | None:
    """Training-trial accuracy against wall time per task: mean over seeds, min-max band, per
    core and variant; the ceiling and 95 % of it dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    ok = [r for r in rows if r.get("status") == "ok" and len(r.get("curve") or []) > 1]
    tasks = sorted({(r["task"], r["dt"]) for r in ok})
    if not tasks:
        return None
    ncol = min(4, len(tasks))
    nrow = math.ceil(len(tasks) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    for ax, (task, dt) in zip(axes.flat, tasks):
        sel = [r for r in ok if (r["task"], r["dt"]) == (task, dt)]
        # the defaults first and drawn boldly; every variant of the task thin beside them
        for label in sorted({(r["core"], r["variant"]) for r in sel}, key=lambda cv: (cv[1] != "defaults", cv)):
            rs = [r for r in sel if (r["core"], r["variant"]) == label]
            grid = np.linspace(min(r["curve"][0][0] for r in rs), max(r["curve"][-1][0] for r in rs), 100)
            ys = np.array([np.interp(grid, [p[0] for p in r["curve"]], [p[2] for p in r["curve"]],
                                     left=np.nan, right=np.nan) for r in rs])   # each seed over its span
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")     # points no seed covers stay empty
                mean, lo, hi = np.nanmean(ys, axis=0), np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
            name = label[0] + ("" if label[1] in ("defaults", "") else f" {label[1]}") + f" (n={len(rs)})"
            default = label[1] == "defaults"
            line, = ax.plot(grid, mean, lw=1.6 if default else 0.8, alpha=1.0 if default else 0.7,
                            label=name if len(name) <= 60 else name[:57] + "...")
            if len(rs) > 1:
                ax.fill_between(grid, lo, hi, alpha=0.2,
                                color=line.get_color())
        now = (ceilings or {}).get((task, dt))
        ceil = now["ceiling"] if now else sel[0].get("ceiling")
        if ceil:
            ax.axhline(ceil, color="g", ls="--", lw=0.8)
            ax.axhline(0.95 * ceil, color="g", ls=":", lw=0.8)
        trivial = now["best_trivial"]["accuracy"] if now else sel[0].get("best_trivial")
        if trivial is not None:
            ax.axhline(trivial, color="gray", ls=":", lw=0.8)
        ax.set_title(f"{task.removesuffix('-v0')} (dt {dt})", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("wall time (s)", fontsize=8)
        ax.set_ylabel("training-trial accuracy", fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # long legends: tight_layout may not fit them
        fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_report(results_dir: str | os.PathLike, new_rows: list[dict], *, title: str = "Results",
                 command: str | None = None) -> dict:
    """Merge ``new_rows`` into ``results_dir/results.json``; write results.md and the plot."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "results.json"
    old = load_rows(path)
    commands = json.loads(path.read_text()).get("commands", []) if path.exists() else []
    if command and command not in commands:
        commands.append(command)
    rows = [dict(r, curve=thin_curve(r["curve"])) if r.get("curve") else r for r in merge_rows(old, new_rows)]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"commands": commands, "rows": rows}, indent=1) + "\n")
    os.replace(tmp, path)
    ceilings = current_ceilings(rows)
    (results_dir / "results.md").write_text(markdown(rows, title=title, commands=commands, ceilings=ceilings))
    plot = plot_curves(rows, results_dir / "learning_curves.png", ceilings)
    return {"results_json": str(path), "results_md": str(results_dir / "results.md"),
            "plot": str(plot) if plot else None, "rows": len(rows)}
