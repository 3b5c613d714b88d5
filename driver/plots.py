"""plots/training_curves.png: reward, accuracy against the ideal ceiling, loss and epsilon."""
from __future__ import annotations

from pathlib import Path

from common.tasks import ideal_accuracy


def plot_training(exp) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = exp.read_metrics()
    cfg = exp.load_config()
    exp.plots_dir.mkdir(parents=True, exist_ok=True)
    path = exp.plots_dir / "training_curves.png"
    ep = [r["episode"] for r in recs]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in recs]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=90)
    axes[0, 0].plot(ep, series("reward"))
    axes[0, 0].set_title("reward per episode")
    axes[0, 1].plot(ep, series("accuracy"), label="accuracy (training trials)")
    ideal = ideal_accuracy(cfg.env_name, cfg.dt)
    if ideal is not None:
        axes[0, 1].axhline(ideal, color="g", ls="--", label=f"ideal observer {ideal:.3f}")
    axes[0, 1].axhline(0.5, color="gray", ls=":", label="chance")
    axes[0, 1].set_ylim(0, 1.02)
    axes[0, 1].legend(fontsize=8)
    axes[0, 1].set_title("accuracy")
    axes[1, 0].plot(ep, series("loss"))
    axes[1, 0].set_yscale("log")
    axes[1, 0].set_title("TD loss")
    axes[1, 1].plot(ep, series("epsilon"))
    axes[1, 1].set_title("epsilon")
    for ax in axes.flat:
        ax.set_xlabel("episode")
    fig.suptitle(f"{cfg.env_name} (dt {cfg.dt}, core {cfg.core}) — {exp.name}")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
