"""Greedy evaluation: accuracy over whole trials, with M carried across the trials of episodes."""
from __future__ import annotations

import numpy as np

from actors.collector import TrialCollector
from common.networks import NetSpec
from common.ceiling import ceiling_for, pct_of_ceiling
from common.tasks import ideal_accuracy, pct_of_ideal

EVAL_SEED_OFFSET = 1_000_000   # eval envs never share seeds with training envs


def evaluate(spec: NetSpec, params: dict, *, env_name: str, dt: int, num_trials: int,
             trials_per_episode: int, seed: int = 0, num_envs: int = 16, epsilon: float = 0.0,
             keep_trials: bool = False) -> dict:
    """Run the policy greedily (ε = ``epsilon``) over whole episodes, ≥ ``num_trials`` trials.

    Returns accuracy, reward per trial, fixation-break rate, the ideal-observer ceiling (None
    when unknown) and accuracy as a percentage of it.
    """
    if num_trials < 1:
        raise ValueError(f"num_trials must be >= 1, got {num_trials}")
    col = TrialCollector(env_name, dt, spec, params, num_envs=num_envs,
                         trials_per_episode=trials_per_episode, seed=seed + EVAL_SEED_OFFSET,
                         actor_id=0)
    col.epsilon = epsilon
    # Count only whole episodes, so every trial position within an episode (and so every
    # amount of carried-over M) is represented in proportion.
    need_episodes = -(-num_trials // trials_per_episode)
    open_trials: dict[int, list] = {}
    trials: list = []
    episodes = 0
    while episodes < need_episodes:
        t, e = col.step()
        for tr in t:
            open_trials.setdefault(tr.env_id, []).append(tr)
        for ep in e:
            if episodes < need_episodes:
                trials.extend(open_trials.get(ep.env_id, []))
                episodes += 1
            open_trials[ep.env_id] = []
    col.close()
    correct = np.array([t.correct for t in trials])
    reward = np.array([t.total_reward for t in trials])
    breaks = np.array([t.fix_breaks > 0 for t in trials])
    premature = np.array([t.premature for t in trials])
    acc = float(correct.mean())
    out = {
        "env_name": env_name, "dt": dt, "episodes": episodes, "trials": len(trials),
        "accuracy": acc, "accuracy_stderr": float(np.sqrt(acc * (1 - acc) / len(trials))),
        "reward_per_trial": float(reward.mean()), "fix_break_rate": float(breaks.mean()),
        "premature_rate": float(premature.mean()),
        "ideal_accuracy": ideal_accuracy(env_name, dt), "pct_ideal": pct_of_ideal(acc, env_name, dt),
        "mean_trial_len": float(np.mean([t.length for t in trials])),
    }
    ceil = ceiling_for(env_name, dt)
    out.update(ceiling=ceil["ceiling"], ceiling_source=ceil["ceiling_source"],
               pct_ceiling=pct_of_ceiling(acc, ceil), best_trivial=ceil["best_trivial"])
    if keep_trials:
        out["_trials"] = trials
    return out
