"""Diagnostics of the learner: R2D2's staleness measure for the replayed recurrent state."""
from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def replay_staleness(net, pairs, replay_init: str = "stored") -> dict | None:
    """How far the state replay starts from is from the state the *current* network would hold.

    ``pairs``: ``[(trial, preceding_trials_of_its_episode), ...]`` (see
    ``TrialBuffer.episode_prefixes``).  For each trial, the "fresh" state re-runs the current
    network from zero over the episode so far; the "replay" state is what replay uses (stored
    M, or zero).  Returns the mean |ΔQ| over the trial's steps, and relative to mean |Q|.
    """
    if not pairs:
        return None
    gaps, scales = [], []
    dev = next(net.parameters()).device
    for trial, prefix in pairs:
        prev = torch.from_numpy(np.concatenate([t.obs for t in prefix]))[None].to(dev)
        _, fresh = net(prev, net.initial_state(1, dev))
        obs = torch.from_numpy(trial.obs)[None].to(dev)
        init = torch.from_numpy(trial.init_state)[None].to(dev)
        if replay_init == "zero":
            init = torch.zeros_like(init)
        q_fresh, _ = net(obs, fresh)
        q_replay, _ = net(obs, init)
        gaps.append(float((q_fresh - q_replay).abs().mean()))
        scales.append(float(q_fresh.abs().mean()))
    gap = float(np.mean(gaps))
    return {"staleness_q_gap": gap, "staleness_rel": gap / max(1e-8, float(np.mean(scales))),
            "staleness_trials": len(pairs)}
