"""plots/training_curves.png: a run's metrics against env steps (top row) and wall time (bottom).

Top: accuracy as % of the task's ceiling (with the best trivial policy's), fixation breaks and
premature responses, TD loss.  Bottom: accuracy as % of ceiling, ε, throughput (env steps/s,
trial-steps/s trained).  Written at the end of a run with ``--plot-training``, or afterwards by
``python main.py plot --experiment-name NAME``.
"""
from __future__ import annotations

import math
from pathlib import Path


def plot_training(exp) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpn_dqn.common.ceiling import ceiling_for

    recs = exp.read_metrics()
    cfg = exp.load_config()
    exp.plots_dir.mkdir(parents=True, exist_ok=True)
    path = exp.plots_dir / "training_curves.png"
    ceil = ceiling_for(cfg.env_name, cfg.dt)

    def series(key):
        return [r.get(key) if isinstance(r.get(key), (int, float)) else math.nan for r in recs]

    steps, wall = series("env_steps"), series("wall_time")
    acc = series("accuracy")
    pct = [100 * a / ceil["ceiling"] if ceil["ceiling"] and not math.isnan(a) else math.nan for a in acc]
    trivial = 100 * ceil["best_trivial"]["accuracy"] / ceil["ceiling"] if ceil["ceiling"] else None
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), dpi=90)

    def accuracy(ax, x, xlabel):
        ax.plot(x, pct, lw=1, label="training trials (with exploration)")
        ax.axhline(100, color="g", ls="--", lw=0.8, label=f"ceiling {ceil['ceiling']:.3f} ({ceil['ceiling_source']})")
        ax.axhline(95, color="g", ls=":", lw=0.8, label="95 % of the ceiling")
        if trivial is not None:
            ax.axhline(trivial, color="gray", ls=":", lw=0.8,
                       label=f"best trivial policy ({ceil['best_trivial']['policy']})")
        ax.set_ylim(0, 110)
        ax.set_ylabel("accuracy, % of ceiling")
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7, loc="lower right")

    accuracy(axes[0, 0], steps, "env steps")
    axes[0, 1].plot(steps, series("fix_break_rate"), lw=1, label="fixation breaks")
    axes[0, 1].plot(steps, series("premature_rate"), lw=1, label="premature responses")
    axes[0, 1].set_ylim(-0.02, 1.02)
    axes[0, 1].set_ylabel("fraction of trials")
    axes[0, 1].set_xlabel("env steps")
    axes[0, 1].legend(fontsize=7)
    axes[0, 2].plot(steps, series("loss"), lw=1)
    if any(v > 0 for v in series("loss") if not math.isnan(v)):
        axes[0, 2].set_yscale("log")
    axes[0, 2].set_ylabel("TD loss")
    axes[0, 2].set_xlabel("env steps")
    accuracy(axes[1, 0], wall, "wall time (s)")
    axes[1, 1].plot(wall, series("epsilon"), lw=1)
    axes[1, 1].set_ylabel("ε (per 100 ms of task time)")
    axes[1, 1].set_xlabel("wall time (s)")
    axes[1, 2].plot(wall, series("env_steps_per_s"), lw=1, label="env steps/s")
    axes[1, 2].plot(wall, series("trial_steps_trained_per_s"), lw=1, label="trial-steps/s trained")
    axes[1, 2].set_ylabel("per second")
    axes[1, 2].set_xlabel("wall time (s)")
    axes[1, 2].legend(fontsize=7)
    fig.suptitle(f"{cfg.env_name} (dt {cfg.dt}, core {cfg.core}) — {exp.name}: {len(recs)} records")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
