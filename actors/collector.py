"""Trial collection: K NeuroGym envs stepped in lockstep with one batched numpy Q-network call.

NeuroGym envs never terminate; the stream of trials is ours to cut into episodes.  The
alignment rules (measured on NeuroGym 2.3.1):

* ``env.unwrapped.gt_now`` read *before* ``step(a_t)`` is the answer ``a_t`` is scored against;
  it is ``gt[t_ind]`` of the trial's ground-truth array ``env.unwrapped.gt``, which NeuroGym
  builds afresh for every trial, so we keep a reference to that array when a trial starts and
  slice its first T entries when the trial ends (no per-step read; tests compare the two).
* ``info["new_trial"]`` is True on the step whose action ended the trial: that step's reward
  belongs to the finished trial; the observation it returns already belongs to the next one.
* ``reset()`` plays a hidden first step with a sampled action, spoiling the first trial.  We
  reset each env once, at construction, and discard its first trial; later episodes need no
  reset (the env's trial stream simply continues).

Episodes: ``trials_per_episode`` consecutive trials of one env.  The recurrent state (M for
the MPN) persists across the trials of an episode and is zeroed only between episodes.
Each stored trial carries the state the actor held before its first step, so replay can start
from exactly the state the actor acted from.

This is a plain class (no Ray): the single-process runtime, the Ray actor and the tests all
use it as is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mpn_dqn.common.networks import NetSpec, NumpyPolicy
from mpn_dqn.common.tasks import TrialOutcome, make_env
from mpn_dqn.common.trial import Trial


@dataclass
class EpisodeStats:
    episode_id: int
    env_id: int
    trials: int
    steps: int
    reward: float
    correct: int
    fix_breaks: int


class TrialCollector:
    """Steps ``num_envs`` envs with one policy; returns completed trials and episode stats.

    Args:
        env_name, dt: the NeuroGym task.
        spec, params: the network (see :mod:`common.networks`) and its weights.
        num_envs: envs stepped in lockstep.
        trials_per_episode: trials per episode (state reset between episodes).
        seed: base seed; env k is seeded ``derive_seed(seed, actor_id, k)``.
        actor_id: stored in every trial (and part of the seeds).
        burn_in_steps: record this many steps of the preceding trial for burn-in replay.
    """

    def __init__(self, env_name: str, dt: int, spec: NetSpec, params: dict, *, num_envs: int = 8,
                 trials_per_episode: int = 10, seed: int = 0, actor_id: int = 0,
                 burn_in_steps: int = 0, weights_version: int = 0):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if trials_per_episode < 1:
            raise ValueError(f"trials_per_episode must be >= 1, got {trials_per_episode}")
        self.spec = spec
        self.policy = NumpyPolicy(spec, params)
        self.weights_version = weights_version
        self.K = num_envs
        self.trials_per_episode = trials_per_episode
        self.actor_id = actor_id
        self.burn_in = burn_in_steps
        self.rng = np.random.default_rng([seed, actor_id, 7])
        self.epsilon = 1.0
        env_seeds = [derive_seed(seed, actor_id, k) for k in range(num_envs)]
        self.envs = [make_env(env_name, dt, seed=s) for s in env_seeds]
        self.units = [e.unwrapped for e in self.envs]
        shape = self.envs[0].observation_space.shape
        if shape != (spec.obs_dim,):            # the numba/numpy step reads obs_dim floats per env
            raise ValueError(f"{env_name} at dt {dt} observes {shape} but the network takes "
                             f"({spec.obs_dim},): the checkpoint belongs to another task")
        self.outcome = TrialOutcome(env_name, self.units[0])
        self.abort_reward = self.outcome.abort_reward
        # the penalty as the float32 rewards hold it, as a Python float (for list.count)
        self._abort32 = float(np.float32(self.abort_reward)) if self.abort_reward is not None else None
        O = spec.obs_dim
        # Step records live in a time-major ring of lockstep rows [R, K, ...]: row t % R holds
        # what every env saw, did and got at lockstep step t, so each step writes whole rows
        # (cheap) and a finished trial of env k is column k of rows start[k] .. t.  The ring
        # doubles when a trial in progress would outgrow it.
        self._R = 64                                      # grows to fit the longest trial
        self.buf_obs = np.zeros((self._R, num_envs, O), np.float32)
        self.buf_act = np.zeros((self._R, num_envs), np.int64)
        self.buf_rew = np.zeros((self._R, num_envs), np.float32)
        self.t = 0                                        # lockstep steps taken
        self.start = np.zeros(num_envs, np.int64)         # lockstep step of each trial's first step
        for k, env in enumerate(self.envs):
            o, _ = env.reset(seed=env_seeds[k])
            self.buf_obs[0, k] = o
        self.obs = self.buf_obs[0]                        # the observations the next step acts on
        self.state = np.zeros((num_envs, spec.state_size), np.float32)
        # env.unwrapped.trial already describes the *next* trial once new_trial is seen, so the
        # ground truth of the trial in progress is captured when that trial starts.
        self.cur_gt = [_ground_truth(u) for u in self.units]
        self.cur_gt_seq = [u.gt for u in self.units]       # the trial's per-step answers
        self.cur_resp = [self.outcome.response_start(u) for u in self.units]
        self._rand_block = 512                            # exploration draws, a block at a time
        self._rand_i = self._rand_block
        self.trial_start_state = np.zeros_like(self.state)
        self.discarding = [True] * num_envs               # first trial after reset is spoiled
        self.trial_in_episode = [0] * num_envs
        self.episode_counter = 0
        self.episode_id = [0] * num_envs
        self.ep_reward = [0.0] * num_envs
        self.ep_steps = [0] * num_envs
        self.ep_correct = [0] * num_envs
        self.ep_fix = [0] * num_envs
        # Burn-in: ring of the last N observations and of the states before each of them.
        if self.burn_in > 0:
            self.ring_obs = np.zeros((num_envs, self.burn_in, O), np.float32)
            self.ring_state = np.zeros((num_envs, self.burn_in, spec.state_size), np.float32)
            self.ring_n = np.zeros(num_envs, np.int64)     # valid entries (reset per episode)
            self.ring_pos = np.zeros(num_envs, np.int64)
            self.prev_burnin = [None] * num_envs           # (obs [N,O], state [S]) for the next trial
        self.env_steps = 0

    # -- weights ---------------------------------------------------------------------------
    def set_params(self, params: dict, version: int) -> None:
        self.policy.load(params)
        self.weights_version = int(version)

    # -- stepping --------------------------------------------------------------------------
    def _act(self, q: np.ndarray) -> np.ndarray:
        """ε-greedy over Q-values [K,A], with the collector's own RNG (uniforms and random
        actions are drawn a block of steps at a time: one call per step is the slow part)."""
        greedy = q.argmax(axis=1)
        if self.epsilon <= 0:
            return greedy
        if self._rand_i >= self._rand_block:
            self._u = self.rng.random((self._rand_block, self.K))
            self._ra = self.rng.integers(0, q.shape[1], size=(self._rand_block, self.K))
            self._rand_i = 0
        i = self._rand_i
        self._rand_i += 1
        np.copyto(greedy, self._ra[i], where=self._u[i] < self.epsilon)
        return greedy

    def step(self) -> tuple[list[Trial], list[EpisodeStats]]:
        """Advance every env by one step; return trials and episodes that completed."""
        trials: list[Trial] = []
        episodes: list[EpisodeStats] = []
        R, t = self._R, self.t
        if t + 1 - int(self.start.min()) >= R:            # a trial in progress would wrap: grow
            self._grow()
            R = self._R
        row, nxt = t % R, (t + 1) % R
        obs = self.obs = self.buf_obs[row]                # [K,O] what the network sees now
        if self.burn_in > 0:
            self._ring_push()
        q = self.policy.step(obs, self.state)             # state now holds M after this step
        self.last_q = q
        actions = self._act(q)
        self.buf_act[row] = actions
        rews, obs_next, ended = [], [], []
        for k, (env, a) in enumerate(zip(self.envs, actions.tolist())):
            o, r, _term, _trunc, info = env.step(a)
            obs_next.append(o)
            rews.append(r)
            if info.get("new_trial", False):
                ended.append(k)
        self.buf_rew[row] = rews
        next_obs = self.buf_obs[nxt]
        next_obs[:] = obs_next
        self.t = t + 1
        self.obs = next_obs
        for k in ended:
            tr = self._finish_trial(k, self.units[k], float(rews[k]))
            if tr is not None:
                trials.append(tr)
                ep = self._maybe_end_episode(k)
                if ep is not None:
                    episodes.append(ep)
        self.env_steps += self.K
        return trials, episodes

    def _grow(self) -> None:
        """Double the ring, keeping the rows of every trial in progress at their step index."""
        old_R, new_R = self._R, 2 * self._R
        g = np.arange(self.t + 1 - old_R, self.t + 1)     # the last old_R lockstep steps
        g = g[g >= 0]
        for name in ("buf_obs", "buf_act", "buf_rew"):
            old = getattr(self, name)
            grown = np.zeros((new_R,) + old.shape[1:], old.dtype)
            grown[g % new_R] = old[g % old_R]
            setattr(self, name, grown)
        self._R = new_R

    def _ring_push(self) -> None:
        """Record (state before this step, obs of this step) for burn-in of the next trial."""
        pos = self.ring_pos
        idx = np.arange(self.K)
        self.ring_obs[idx, pos] = self.obs
        self.ring_state[idx, pos] = self.state
        self.ring_pos = (pos + 1) % self.burn_in
        self.ring_n = np.minimum(self.ring_n + 1, self.burn_in)

    def _ring_snapshot(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = int(self.ring_n[k])
        N = self.burn_in
        order = (self.ring_pos[k] - n + np.arange(n)) % N          # oldest first
        return self.ring_obs[k, order].copy(), self.ring_state[k, order[0]].copy() if n else \
            np.zeros(0, np.float32)

    def _finish_trial(self, k: int, u, final_reward: float) -> Trial | None:
        s, end = int(self.start[k]), self.t              # the trial's steps: s .. end-1
        self.start[k] = end
        start_state = self.trial_start_state[k].copy()
        ground_truth = self.cur_gt[k]
        gt_seq = self.cur_gt_seq[k]
        self.cur_gt[k] = _ground_truth(u)                          # the trial that starts now
        self.cur_gt_seq[k] = u.gt
        resp = self.cur_resp[k]
        self.cur_resp[k] = self.outcome.response_start(u)
        self.trial_start_state[k] = self.state[k]                   # next trial starts from here
        if self.discarding[k]:
            # The spoiled first trial after reset(): drop it and start the first episode fresh.
            self.discarding[k] = False
            self._start_episode(k)
            return None
        T = end - s
        a = s % self._R
        rows = slice(a, a + T) if a + T <= self._R else np.arange(s, end) % self._R   # wraps?
        actions = self.buf_act[rows, k].copy()
        rewards = self.buf_rew[rows, k].copy()
        gt = np.array(gt_seq[:T], dtype=np.int64)                # gt_now of each step (a copy)
        if gt.shape[0] != T:
            raise RuntimeError(f"{type(u).__name__}: a trial of {T} steps has only "
                               f"{gt.shape[0]} ground-truth entries")
        correct = self.outcome.correct(actions, rewards, gt, ground_truth)
        premature = bool(actions[:resp].any())
        rl = rewards.tolist()
        fix = rl.count(self._abort32) if self.abort_reward is not None else 0
        trial_end = np.zeros(T, bool)
        trial_end[-1] = True
        trial = Trial(
            obs=self.buf_obs[rows, k].copy(), actions=actions, rewards=rewards, gt=gt, trial_end=trial_end,
            init_state=start_state, ground_truth=ground_truth, correct=bool(correct), fix_breaks=fix,
            premature=premature,
            episode_id=self.episode_id[k], actor_id=self.actor_id, env_id=k,
            trial_index=self.trial_in_episode[k], weights_version=self.weights_version)
        if self.burn_in > 0:
            prev = self.prev_burnin[k]
            if prev is not None:
                trial.burnin_obs, trial.burnin_state = prev
            else:
                trial.burnin_obs = np.zeros((0, self.spec.obs_dim), np.float32)
                trial.burnin_state = np.zeros(0, np.float32)
            self.prev_burnin[k] = self._ring_snapshot(k)
        self.trial_in_episode[k] += 1
        self.ep_reward[k] += math.fsum(rl)
        self.ep_steps[k] += T
        self.ep_correct[k] += bool(correct)
        self.ep_fix[k] += fix
        return trial

    def _maybe_end_episode(self, k: int) -> EpisodeStats | None:
        if self.trial_in_episode[k] < self.trials_per_episode:
            return None
        stats = EpisodeStats(episode_id=self.episode_id[k], env_id=k, trials=self.trial_in_episode[k],
                             steps=self.ep_steps[k], reward=self.ep_reward[k],
                             correct=self.ep_correct[k], fix_breaks=self.ep_fix[k])
        self._start_episode(k)
        return stats

    def _start_episode(self, k: int) -> None:
        """Zero the recurrent state: the next trial is the first of a new episode."""
        self.state[k] = 0.0
        self.trial_start_state[k] = 0.0
        self.trial_in_episode[k] = 0
        self.episode_id[k] = self.episode_counter
        self.episode_counter += 1
        self.ep_reward[k] = 0.0
        self.ep_steps[k] = 0
        self.ep_correct[k] = 0
        self.ep_fix[k] = 0
        if self.burn_in > 0:
            self.ring_n[k] = 0
            self.prev_burnin[k] = None

    def close(self) -> None:
        for env in self.envs:
            env.close()


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from any tuple of non-negative ints (NeuroGym needs < 2**32)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _ground_truth(u) -> int:
    trial = getattr(u, "trial", None) or {}
    gt = trial.get("ground_truth", -1)
    try:
        return int(gt)
    except (TypeError, ValueError):
        return -1
