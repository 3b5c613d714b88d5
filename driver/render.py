"""Render a recorded episode as an animated GIF (matplotlib frames -> imageio)."""
from __future__ import annotations

import numpy as np

from common.networks import NetSpec

MAX_FRAMES = 300


def write_gif(ep: dict, spec: NetSpec, output: str, *, title: str, fps: int = 8) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import imageio.v2 as imageio
    import matplotlib.pyplot as plt

    T = len(ep["action"])
    stride = max(1, int(np.ceil(T / MAX_FRAMES)))
    frames_idx = list(range(0, T, stride))
    if frames_idx[-1] != T - 1:
        frames_idx.append(T - 1)
    ends = np.flatnonzero(ep["trial_end"])
    obs, q = ep["obs"], ep["q"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), dpi=72)
    (ax_obs, ax_m), (ax_act, ax_q) = axes
    fig.suptitle(title)
    state_img = None
    frames = []
    for t in frames_idx:
        for ax in (ax_obs, ax_act, ax_q):
            ax.cla()
        lo = max(0, t - 120)
        xs = np.arange(lo, t + 1)
        for i in range(obs.shape[1]):
            ax_obs.plot(xs, obs[lo:t + 1, i], lw=1, label=f"obs {i}")
        ax_obs.set_title("observations")
        ax_obs.legend(loc="upper left", fontsize=6)
        ax_act.step(xs, ep["gt"][lo:t + 1], where="post", label="ground truth", lw=2, alpha=0.6)
        ax_act.step(xs, ep["action"][lo:t + 1], where="post", label="action", lw=1)
        ax_act.set_ylim(-0.5, spec.num_actions - 0.5)
        ax_act.set_title("actions vs ground truth")
        ax_act.legend(loc="upper left", fontsize=6)
        for i in range(q.shape[1]):
            ax_q.plot(xs, q[lo:t + 1, i], lw=1, label=f"Q[{i}]")
        ax_q.set_title("Q-values")
        ax_q.legend(loc="upper left", fontsize=6)
        for ax in (ax_obs, ax_act, ax_q):
            for e in ends[(ends >= lo) & (ends <= t)]:
                ax.axvline(e + 0.5, color="k", ls="--", lw=0.8)
            ax.set_xlim(lo, max(lo + 10, t + 1))
        st = ep["state"][t]
        if spec.core == "mpn":
            img = st.reshape(spec.in_dim, spec.hidden_dim)
            label = "M (inputs x hidden units)"
        else:
            img = st.reshape(-1, spec.hidden_dim)
            label = "recurrent state"
        if state_img is None:
            lim = max(1e-3, float(np.abs(ep["state"]).max()))
            state_img = ax_m.imshow(img, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim,
                                    interpolation="nearest")
            fig.colorbar(state_img, ax=ax_m)
        else:
            state_img.set_data(img)
        trial_no = int((ends < t).sum()) + 1
        ax_m.set_title(f"{label} — step {t}, trial {trial_no}" + ("  [trial end]" if ep["trial_end"][t] else ""))
        fig.tight_layout()
        fig.canvas.draw()
        frames.append(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    # imageio >= 2.28 (pillow plugin) takes the frame duration in milliseconds, not seconds
    imageio.mimsave(output, frames, duration=1000.0 / fps, loop=0)
    return len(frames)
