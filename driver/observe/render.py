"""Render greedy trials as an animated GIF: the whole episode drawn once, a cursor that moves.

Left, against time in ms: the observations (channels named after the task's own observation
names), the agent's actions against the ground truth (named after the task's actions), each
trial's answer marked correct (green dot) or not (red cross), and the Q-values; every task period is
shaded (fixation, stimulus, delay, decision, ...; legend on top) and trial boundaries are dashed.
Right: the recurrent state at the cursor — the MPN's M with its rows named by input channel, or
the GRU/LSTM state.  Frames only move the cursor and repaint the heatmap, so one episode renders
in seconds into a few MB.
"""
from __future__ import annotations

import numpy as np

MAX_FRAMES = 150


def channel_names(names: dict, n: int, prefix: str) -> list[str]:
    """One label per channel from NeuroGym's ``{name: index or [indices]}``."""
    out = [f"{prefix} {i}" for i in range(n)]
    for key, idx in (names or {}).items():
        idx = [idx] if isinstance(idx, int) else list(idx)
        for j, i in enumerate(idx):
            if 0 <= i < n:
                out[i] = key if len(idx) == 1 else f"{key} {j + 1}"
    return out


def write_gif(rec, output: str, *, title: str, fps: int = 8) -> int:
    """``rec``: a :class:`common.analysis.Record` of consecutive trials of one env."""
    import matplotlib
    matplotlib.use("Agg")
    import imageio.v2 as imageio
    import matplotlib.pyplot as plt

    meta = rec.meta
    dt = meta["dt"]
    T = len(rec["action"])
    t_ms = np.arange(T) * dt
    obs, q, act, gt = rec["obs"], rec["q"], rec["action"], rec["gt"]
    obs_names = channel_names(meta["observation_names"], obs.shape[1], "obs")
    act_names = channel_names(meta["action_names"], meta["num_actions"], "action")
    periods = meta["period_names"]
    colors = plt.get_cmap("Pastel1")
    fig = plt.figure(figsize=(11, 6.2), dpi=72)
    gs = fig.add_gridspec(3, 2, width_ratios=[2.2, 1])
    ax_obs, ax_act, ax_q = (fig.add_subplot(gs[i, 0]) for i in range(3))
    ax_m = fig.add_subplot(gs[:, 1])
    fig.suptitle(title, fontsize=10)
    offs = rec["trial_offsets"]
    for ax in (ax_obs, ax_act, ax_q):                    # periods shaded, trial boundaries dashed
        for code, name in enumerate(periods):
            on = np.flatnonzero(rec["period"] == code)
            if len(on):
                starts = on[np.r_[True, np.diff(on) > 1]]
                ends = on[np.r_[np.diff(on) > 1, True]]
                for a, b in zip(starts, ends):
                    ax.axvspan(a * dt, (b + 1) * dt, color=colors(code % 9), lw=0,
                               label=name if (ax is ax_obs and a == starts[0]) else None)
        for o in offs[1:-1]:
            ax.axvline(o * dt, color="k", ls="--", lw=0.6)
        ax.set_xlim(0, T * dt)
    for i in range(obs.shape[1]):
        ax_obs.plot(t_ms, obs[:, i], lw=0.8, label=obs_names[i])
    ax_obs.set_ylabel("observation")
    ax_obs.legend(loc="upper left", fontsize=6, ncol=4, bbox_to_anchor=(0, 1.35), frameon=False)
    ax_act.step(t_ms, gt, where="post", lw=2.5, alpha=0.5, color="tab:green", label="ground truth")
    ax_act.step(t_ms, act, where="post", lw=1, color="k", label="action")
    ax_act.set_yticks(range(len(act_names)))
    ax_act.set_yticklabels(act_names, fontsize=7)
    ax_act.set_ylim(-0.5, len(act_names) - 0.2)
    ends_ms = (offs[1:] - 0.5) * dt
    ok = rec["trial_correct"].astype(bool)
    top = len(act_names) - 0.45
    ax_act.scatter(ends_ms[ok], np.full(ok.sum(), top), marker="o", s=30, color="green", label="correct")
    ax_act.scatter(ends_ms[~ok], np.full((~ok).sum(), top), marker="X", s=40, color="red", label="wrong")
    ax_act.legend(loc="lower left", fontsize=6, ncol=4)
    for i in range(q.shape[1]):
        ax_q.plot(t_ms, q[:, i], lw=0.8, label=f"Q({act_names[i]})")
    ax_q.set_ylabel("Q-value")
    ax_q.set_xlabel("time (ms)")
    ax_q.legend(loc="upper left", fontsize=6, ncol=3)
    state = rec.state()
    if meta["core"] == "mpn" and "M" in rec.arrays:
        rows = obs_names + ["constant input"]
        shape = (meta["in_dim"], meta["hidden_dim"])
        label = "M (rows: input channels; columns: hidden units)"
    else:
        rows, shape, label = None, (-1, meta["hidden_dim"]), "recurrent state"
    lim = max(1e-3, float(np.percentile(np.abs(state), 99)))          # a few outliers saturate
    img = ax_m.imshow(state[0].reshape(shape), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim,
                      interpolation="nearest")
    if rows is not None:
        ax_m.set_yticks(range(len(rows)))
        ax_m.set_yticklabels(rows, fontsize=7)
    ax_m.set_xlabel("hidden unit")
    fig.colorbar(img, ax=ax_m, fraction=0.05)
    m_title = ax_m.set_title(label, fontsize=8)
    cursors = [ax.axvline(0, color="r", lw=1.2) for ax in (ax_obs, ax_act, ax_q)]
    fig.tight_layout()
    stride = max(1, int(np.ceil(T / MAX_FRAMES)))
    idx = list(range(0, T, stride))
    if idx[-1] != T - 1:
        idx.append(T - 1)
    frames = []
    for t in idx:
        for c in cursors:
            c.set_xdata([t * dt, t * dt])
        img.set_data(state[t].reshape(shape))
        k = int(rec["trial"][t])
        m_title.set_text(f"{label}\nt = {t * dt} ms, trial {k + 1}, "
                         f"{periods[rec['period'][t]] if rec['period'][t] >= 0 else ''}")
        fig.canvas.draw()
        frames.append(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    # imageio >= 2.28 (pillow plugin) takes the frame duration in milliseconds, not seconds
    imageio.mimsave(output, frames, duration=1000.0 / fps, loop=0)
    return len(frames)
