"""``python main.py analyze``: record a trained agent's greedy trials and draw what it computes.

Writes ``experiments/NAME/analysis/``: ``trials.npz`` (:mod:`common.analysis`), ``summary.json``
and the figures below; a figure that does not apply to the task is skipped with a line saying
why.

- ``psychometric.png``: P(choosing the second option) against the signed evidence, the agent's
  beside the ideal observer's (which sums the evidence of the same trials' observations), and the
  commitment time (from stimulus onset to the step from which every action is the final choice)
  against the evidence strength; for tasks with one coherence and two stimulus channels
  (PerceptualDecisionMaking and kin).
- ``pca.png``: h and M projected on their first two principal components (variance explained
  on the axes): trial-averaged trajectories per ground truth and per the task's first other trial
  variable (e.g. the sample, the context, the coherence), and every step coloured by period.
- ``decoding.png``: cross-validated decoding accuracy over time (from trial onset) of the ground
  truth and of each categorical trial variable, from h and from M, with a shuffled-label control
  and chance; the periods shaded.
- ``cross_temporal.png``: decoders trained at one step and tested at every other, from h and M.
- ``summary.json``: greedy accuracy, ceiling, participation ratios of h and M, and how well M at
  the first step of a trial decodes the previous trial's ground truth (memory across trials).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from mpn_dqn.common import analysis as an

MAX_TIME_POINTS = 40            # decoding over time: at most this many steps (a stride beyond)


def run_analyze(exp, *, checkpoint: str | None, num_trials: int, seed: int, log=print) -> dict:
    from mpn_dqn.common.ceiling import ceiling_for
    from mpn_dqn.driver.experiment import load_policy_params
    t0 = time.time()
    cfg = exp.load_config()
    spec, params, _, path = load_policy_params(exp, checkpoint)
    out_dir = exp.dir / "analysis"
    log(f"Recording {num_trials} greedy trials of {exp.name} ({cfg.env_name}, dt {cfg.dt}, core "
        f"{spec.core}) with {Path(path).name} ...")
    rec_arrays = an.record_trials(spec, params, cfg.env_name, cfg.dt, num_trials=num_trials,
                                  trials_per_episode=cfg.trials_per_episode, seed=seed)
    an.save_record(rec_arrays, out_dir / "trials.npz")
    rec = an.load_record(out_dir / "trials.npz")
    ceil = ceiling_for(cfg.env_name, cfg.dt)
    acc = float(rec["trial_correct"].mean())
    title = f"{cfg.env_name} (dt {cfg.dt}, {spec.core}): accuracy {acc:.3f}, ceiling {ceil['ceiling']:.3f}"
    summary = {"experiment": exp.name, "checkpoint": Path(path).name, "env_name": cfg.env_name,
               "dt": cfg.dt, "core": spec.core, "trials": rec.num_trials, "accuracy": acc,
               "ceiling": ceil["ceiling"], "fix_break_rate": float(rec["trial_fix_break"].mean()),
               "participation_ratio_h": an.participation_ratio(rec["h"]),
               "participation_ratio_M": an.participation_ratio(rec.state()),
               "figures": {}, "skipped": {}}
    for name, fn in (("psychometric", _psychometric), ("pca", _pca), ("decoding", _decoding),
                     ("cross_temporal", _cross_temporal)):
        try:
            res = fn(rec, out_dir / f"{name}.png", title)
        except _Skip as why:
            summary["skipped"][name] = str(why)
            log(f"  {name}.png: skipped ({why})")
            continue
        summary["figures"][name] = f"{name}.png"
        summary.update(res or {})
        log(f"  {name}.png" + ("" if not res else ": " + ", ".join(
            f"{k} {v:.3f}" for k, v in res.items() if isinstance(v, float))))
    summary.update(_across_trials(rec))
    summary["seconds"] = round(time.time() - t0, 1)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"Analysis of {rec.num_trials} trials in {summary['seconds']:.0f} s: accuracy {acc:.3f}; "
        f"participation ratio h {summary['participation_ratio_h']:.1f}, M "
        f"{summary['participation_ratio_M']:.1f} -> {out_dir}")
    return summary


class _Skip(Exception):
    """A figure does not apply to this task (the message says why)."""


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path, title: str) -> None:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)


def _first_answer(rec, i: int, start: int = 0) -> tuple[int, int]:
    """(action, step) of trial i's first non-fixate action at or after ``start``; (0, -1) if none."""
    o, n = rec["trial_offsets"][i], rec["trial_length"][i]
    acts = rec["action"][o + start:o + n]
    nz = np.flatnonzero(acts)
    return (int(acts[nz[0]]), start + int(nz[0])) if len(nz) else (0, -1)


def _psychometric(rec, path: Path, title: str) -> dict:
    obs_names = rec.meta["observation_names"]
    stim = obs_names.get("stimulus")
    if "cond_coh" not in rec.arrays or not isinstance(stim, list) or len(stim) != 2:
        raise _Skip("the task has no single signed evidence variable (a coherence on two stimulus channels)")
    if "stimulus" not in rec.meta["period_names"] or rec.meta["num_actions"] != 3:
        raise _Skip("needs a stimulus period and two answers")
    names = rec.meta["period_names"]
    gt = rec["trial_ground_truth"]
    coh = rec["cond_coh"]
    signed = np.where(gt == 1, coh, -coh)
    resp_start = [int(np.flatnonzero(rec["period"][o:o + n] == names.index("decision"))[0])
                  if "decision" in names and (rec["period"][o:o + n] == names.index("decision")).any() else 0
                  for o, n in zip(rec["trial_offsets"][:-1], rec["trial_length"])]
    choice, ideal, dec_time = [], [], []
    dt = rec.meta["dt"]
    for i in range(rec.num_trials):
        o, n = rec["trial_offsets"][i], rec["trial_length"][i]
        a, _ = _first_answer(rec, i, resp_start[i])
        if a == 0:                                  # no answer in the decision period: its last answer
            a = int(rec["action"][o + n - 1])
        choice.append(a)
        on = rec["period"][o:o + n] == names.index("stimulus")
        ev = (rec["obs"][o:o + n][on, stim[1]] - rec["obs"][o:o + n][on, stim[0]]).sum()
        ideal.append(2 if ev > 0 else 1)
        # commitment: from the step after the last action that differs from the final choice
        onset = int(np.flatnonzero(on)[0]) if on.any() else 0
        acts = rec["action"][o + onset:o + max(resp_start[i], onset) + 1]
        other = np.flatnonzero(acts != a)
        dec_time.append(((other[-1] + 1) if len(other) else 0) * dt)
    choice, ideal, dec_time = np.array(choice), np.array(ideal), np.array(dec_time, float)
    levels = np.unique(signed)
    p_agent = np.array([(choice[signed == v] == 2).mean() for v in levels])
    p_ideal = np.array([(ideal[signed == v] == 2).mean() for v in levels])
    n_per = np.array([(signed == v).sum() for v in levels])
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    se = np.sqrt(p_agent * (1 - p_agent) / np.maximum(n_per, 1))
    ax[0].errorbar(levels, p_agent, yerr=se, marker="o", label="agent", capsize=2)
    ax[0].plot(levels, p_ideal, "g--", marker="s", label="ideal observer (same trials)")
    ax[0].set_xlabel("signed coherence (+: evidence for the second option)")
    ax[0].set_ylabel("P(choose the second option, action 2)")
    ax[0].set_ylim(-0.02, 1.02)
    ax[0].axhline(0.5, color="gray", lw=0.5)
    ax[0].legend(fontsize=8)
    strength = np.unique(np.abs(signed))
    med = [np.nanmedian(dec_time[np.abs(signed) == s]) if np.isfinite(dec_time[np.abs(signed) == s]).any()
           else np.nan for s in strength]
    ax[1].plot(strength, med, marker="o")
    ax[1].set_xlabel("|coherence|")
    ax[1].set_ylabel("commitment time after stimulus onset (ms)\n(median; from it on the action is the choice)",
                     fontsize=8)
    _save(fig, path, title)
    mono = bool(np.all(np.diff(p_agent) >= -2 * np.maximum(se[1:], se[:-1]) - 1e-9))
    return {"psychometric_max_gap_to_ideal": float(np.max(np.abs(p_agent - p_ideal))),
            "psychometric_monotone_within_2se": mono}


def _pca(rec, path: Path, title: str) -> dict:
    plt = _plt()
    variables = _variables(rec)
    other = next((k for k in variables if k != "ground truth"), None)   # e.g. the sample, context, coherence
    ncol = 3 if other else 2
    fig, axes = plt.subplots(2, ncol, figsize=(5 * ncol, 8))
    names = rec.meta["period_names"]
    out = {}
    for row, (label, X) in enumerate((("h", rec["h"]), ("M", rec.state()))):
        scores, evr = an.pca(X, 2)
        out[f"pca_{label}_variance_2pc"] = float(evr.sum())
        for col, (vname, y) in enumerate([("ground truth", rec["trial_ground_truth"])]
                                         + ([(other, variables[other])] if other else [])):
            ax = axes[row, 0 if col == 0 else 2]
            for v, m in rec.condition_means(scores, y).items():
                ax.plot(m[:, 0], m[:, 1], marker=".", lw=1, label=f"{vname} {v:.3g}")
                ax.plot(m[0, 0], m[0, 1], "ko", ms=3)
            ax.set_title(f"{label}: trial-averaged trajectories by {vname} (dot: onset)", fontsize=9)
        ax = axes[row, 1]
        per = rec["period"]
        for code, pname in enumerate(names):
            sel = per == code
            if sel.any():
                idx = np.flatnonzero(sel)[:: max(1, sel.sum() // 3000)]
                ax.scatter(scores[idx, 0], scores[idx, 1], s=3, alpha=0.4, label=pname)
        ax.set_title(f"{label}: every step, by period", fontsize=9)
        for ax in axes[row]:
            ax.set_xlabel(f"PC1 ({100 * evr[0]:.0f} % of variance)")
            ax.set_ylabel(f"PC2 ({100 * evr[1]:.0f} %)" if len(evr) > 1 else "PC2")
            ax.legend(fontsize=7, markerscale=3)
    _save(fig, path, title)
    return out


def _variables(rec) -> dict[str, np.ndarray]:
    out = {"ground truth": rec["trial_ground_truth"]}
    out.update((k, v) for k, v in rec.conditions().items() if v.ndim == 1 and k != "ground_truth")
    return {k: v for k, v in out.items() if an.decodable(v)}


def _steps(rec) -> np.ndarray:
    T = int(rec["trial_length"].min())
    return np.arange(0, T, max(1, math.ceil(T / MAX_TIME_POINTS)))


def _shade_periods(ax, rec, steps_ms: float) -> None:
    names = rec.meta["period_names"]
    first = rec["trial_offsets"][0]
    per = rec["period"][first:first + int(rec["trial_length"].min())]
    for code, pname in enumerate(names):
        idx = np.flatnonzero(per == code)
        if len(idx) and code % 2 == 0:
            ax.axvspan(idx[0] * steps_ms, (idx[-1] + 1) * steps_ms, color="0.92", zorder=0)
        if len(idx):
            ax.text(idx[0] * steps_ms, 1.01, pname, fontsize=6, va="bottom")


def _decoding(rec, path: Path, title: str) -> dict:
    variables = _variables(rec)
    if not variables:
        raise _Skip("no trial variable with 2-12 values on at least 5 trials each")
    steps = _steps(rec)
    dt = rec.meta["dt"]
    plt = _plt()
    fig, axes = plt.subplots(1, len(variables), figsize=(4.5 * len(variables), 3.8), squeeze=False)
    out = {}
    for ax, (name, y) in zip(axes[0], variables.items()):
        for label, X, style in (("h", rec["h"], "-"), ("M", rec.state(), "-")):
            al = rec.aligned(X)[:, steps]
            acc = an.decode_over_time(al, y)
            ax.plot(steps * dt, acc, style, marker=".", label=f"from {label}")
            out[f"decode_{name.replace(' ', '_')}_{label}_max"] = float(acc.max())
            out[f"decode_{name.replace(' ', '_')}_{label}_mean"] = float(acc.mean())
        ctrl = an.decode_over_time(rec.aligned(rec.state())[:, steps], y, shuffle=True)
        out[f"decode_{name.replace(' ', '_')}_shuffled_mean"] = float(ctrl.mean())
        ax.plot(steps * dt, ctrl, ":", color="gray", label="M, shuffled labels")
        chance = np.unique(y, return_counts=True)[1].max() / len(y)
        ax.axhline(chance, color="k", lw=0.5, ls="--", label=f"majority class {chance:.2f}")
        _shade_periods(ax, rec, dt)
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("time from trial onset (ms)")
        ax.set_ylabel("cross-validated decoding accuracy")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    _save(fig, path, title)
    return out


def _cross_temporal(rec, path: Path, title: str) -> dict:
    variables = _variables(rec)
    if not variables:
        raise _Skip("no trial variable with 2-12 values on at least 5 trials each")
    # the stimulus variable where the task has one (e.g. the sample), else the ground truth
    name = next((k for k in variables if k != "ground truth"), "ground truth")
    y = variables[name]
    steps = _steps(rec)
    dt = rec.meta["dt"]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    out = {}
    for ax, (label, X) in zip(axes, (("h", rec["h"]), ("M", rec.state()))):
        acc = an.cross_temporal(rec.aligned(X)[:, steps], y)
        im = ax.imshow(acc, origin="lower", vmin=0, vmax=1, cmap="viridis", aspect="auto",
                       extent=[steps[0] * dt, (steps[-1] + 1) * dt, steps[0] * dt, (steps[-1] + 1) * dt])
        ax.set_xlabel("test time from onset (ms)")
        ax.set_ylabel("train time from onset (ms)")
        ax.set_title(f"{name} from {label}", fontsize=9)
        fig.colorbar(im, ax=ax, label="accuracy")
        out[f"cross_temporal_{label}_offdiag_mean"] = float(acc[~np.eye(len(acc), dtype=bool)].mean())
    _save(fig, path, title)
    return out


def _across_trials(rec) -> dict:
    """Decoding the previous trial's ground truth from M (and h) at a trial's first step."""
    later = np.flatnonzero(rec["trial_in_episode"] > 0)
    if len(later) < 20:
        return {"previous_trial": "fewer than 20 trials follow another in the same episode"}
    prev = rec["trial_ground_truth"][later - 1]
    if not an.decodable(prev):
        return {"previous_trial": "the previous trial's ground truth takes one value"}
    out = {}
    for label, X in (("h", rec["h"]), ("M", rec.state())):
        first = rec.at_step(X, "first")[later]
        out[f"previous_trial_ground_truth_from_{label}"] = an.decode(first, prev)
    out["previous_trial_ground_truth_shuffled"] = an.decode(rec.at_step(rec.state(), "first")[later], prev,
                                                            shuffle=True)
    return out
