"""The trial record: one completed NeuroGym trial as the actor lived it.

A trial of T steps holds, for t = 0..T-1 (step t is the agent's t-th action of the trial):

    obs[t]        float32 [T, O]  the observation the network saw before acting at step t
    actions[t]    int64   [T]     the action taken
    rewards[t]    float32 [T]     the reward of that action (the ending step's reward belongs
                                  to this trial: NeuroGym reports the end on that step)
    gt[t]         int64   [T]     env.unwrapped.gt_now read before step t (the step's answer)
    trial_end[t]  bool    [T]     True only at t = T-1 (kept explicit so the codec can check it)

plus ``init_state`` float32 [S]: the recurrent state (for the MPN, M flattened [I*H]) the actor
held *before* step 0 — the state it acted from — and, for burn-in replay, ``burnin_obs``
float32 [N, O] (the last N observations of the preceding trial of the same episode, N may be
0) with ``burnin_state`` [S], the state before the first of them.

Metadata: ``ground_truth`` (the trial's answer), ``correct`` (scored by
:class:`common.tasks.TrialOutcome`), ``fix_breaks`` (steps penalised for breaking fixation),
episode and actor ids, ``trial_index`` within the episode, and ``weights_version`` of the
policy that acted.  ``premature`` (a non-fixate action before the response window) is known
where the trial was collected and is not sent to the replay server.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Trial:
    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    gt: np.ndarray
    trial_end: np.ndarray
    init_state: np.ndarray
    burnin_obs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    burnin_state: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    ground_truth: int = 0
    correct: bool = False
    fix_breaks: int = 0
    premature: bool = False
    episode_id: int = 0
    actor_id: int = 0
    env_id: int = 0
    trial_index: int = 0
    weights_version: int = 0

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])

    @property
    def total_reward(self) -> float:
        return float(self.rewards.sum())

    def payload_nbytes(self) -> int:
        """Bytes of array data this trial carries (the replay's memory yardstick)."""
        arrays = (self.obs, self.actions, self.rewards, self.gt, self.trial_end, self.init_state,
                  self.burnin_obs, self.burnin_state)
        return int(sum(a.nbytes for a in arrays))
