"""Greedy evaluation: accuracy over whole trials, with M carried across the trials of episodes."""
from __future__ import annotations

import numpy as np

from mpn_dqn.actors.collector import TrialCollector
from mpn_dqn.common.networks import NetSpec
from mpn_dqn.common.ceiling import ceiling_for, pct_of_ceiling
from mpn_dqn.common.tasks import ideal_accuracy, pct_of_ideal

EVAL_SEED_OFFSET = 1_000_000   # eval envs never share seeds with training envs


class Tally:
    """Running sums over the trials of finished episodes: memory stays constant however many
    episodes an evaluation runs."""

    def __init__(self):
        self.trials = 0
        self.correct = 0
        self.reward = 0.0
        self.fix_breaks = 0
        self.premature = 0
        self.steps = 0

    def add(self, trials: list) -> None:
        for t in trials:
            self.trials += 1
            self.correct += bool(t.correct)
            self.reward += float(t.total_reward)
            self.fix_breaks += t.fix_breaks > 0
            self.premature += bool(t.premature)
            self.steps += int(t.length)

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials if self.trials else 0.0


def evaluate(spec: NetSpec, params: dict, *, env_name: str, dt: int, num_trials: int,
             trials_per_episode: int, seed: int = 0, num_envs: int = 16, epsilon: float = 0.0,
             progress=None) -> dict:
    """Run the policy greedily (ε = ``epsilon``) over whole episodes, ≥ ``num_trials`` trials.

    Returns accuracy, reward per trial, fixation-break rate, the ideal-observer ceiling (None
    when unknown) and accuracy as a percentage of it.  Only the trials of episodes still in
    progress are held.
    ``progress(episodes_done, episodes_needed, tally)`` is called whenever episodes finish.
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
    tally = Tally()
    episodes = 0
    while episodes < need_episodes:
        t, e = col.step()
        for tr in t:
            open_trials.setdefault(tr.env_id, []).append(tr)
        for ep in e:
            if episodes < need_episodes:
                done = open_trials.get(ep.env_id, [])
                tally.add(done)
                episodes += 1
            open_trials[ep.env_id] = []
        if e and progress is not None:
            progress(episodes, need_episodes, tally)
    col.close()
    n, acc = tally.trials, tally.accuracy
    out = {
        "env_name": env_name, "dt": dt, "episodes": episodes, "trials": n,
        "accuracy": acc, "accuracy_stderr": float(np.sqrt(acc * (1 - acc) / n)),
        "reward_per_trial": tally.reward / n, "fix_break_rate": tally.fix_breaks / n,
        "premature_rate": tally.premature / n,
        "ideal_accuracy": ideal_accuracy(env_name, dt), "pct_ideal": pct_of_ideal(acc, env_name, dt),
        "mean_trial_len": tally.steps / n,
    }
    ceil = ceiling_for(env_name, dt)
    out.update(ceiling=ceil["ceiling"], ceiling_source=ceil["ceiling_source"],
               pct_ceiling=pct_of_ceiling(acc, ceil), best_trivial=ceil["best_trivial"])
    return out
