"""NeuroGym task vocabulary: making envs, checking names and timing, scoring trials.

* :func:`native_dt` is a task's own registered time step; :func:`check_task` refuses a task
  that is not a trial-based task with answers, or a dt the task cannot run at.
* :class:`TrialOutcome` says whether a finished trial was answered correctly and where its
  response window starts (for premature responses), the same way for the agent, its
  evaluation and the scripted policies of ``ceiling`` (:mod:`common.ceiling`).
* ``IDEAL_ACCURACY`` holds the observation-only ideal observers known per task and dt
  (analytic or measured over thousands of trials); where none is known the ground-truth
  oracle is the ceiling (:mod:`common.ceiling`).
"""
from __future__ import annotations

import difflib
import functools
import os
import warnings

import numpy as np

# (task, dt) -> ideal-observer accuracy (observations only).  Chance is 0.5 for these tasks.
IDEAL_ACCURACY = {
    ("PerceptualDecisionMaking-v0", 100): 0.896,
    ("PerceptualDecisionMaking-v0", 20): 0.895,
    ("PerceptualDecisionMaking-v0", 10): 0.887,
    ("ContextDecisionMaking-v0", 100): 0.941,
    ("ContextDecisionMaking-v0", 20): 0.943,
    ("ContextDecisionMaking-v0", 10): 0.944,
    ("DelayMatchSample-v0", 100): 1.0,
    ("DelayMatchSample-v0", 20): 1.0,
    ("DelayMatchSample-v0", 10): 1.0,
    # Measured here (not in the notes): a Bayes observer that knows the five frequency pairs and
    # the noise, 20 000 trials at dt 100 (stderr 0.0035): 0.996.
    ("DelayComparison-v0", 100): 0.996,
    # Unsolvable as registered: with the default dim_ring = 2 the stimulus channels are
    # 0.5 ± 0.5·cos θ, and θ and 2π - θ (one in each category) look the same, so the sample's
    # category is not in the observations (tests/test_tasks.py checks it).  Ceiling = chance.
    ("DelayMatchCategory-v0", 100): 0.5,
    ("DelayMatchCategory-v0", 20): 0.5,
    ("DelayMatchCategory-v0", 10): 0.5,
}
CHANCE_ACCURACY = {"PerceptualDecisionMaking-v0": 0.5, "ContextDecisionMaking-v0": 0.5,
                   "DelayMatchSample-v0": 0.5, "DelayComparison-v0": 0.5, "DelayMatchCategory-v0": 0.5}


# The NeuroGym battery of the Multi-Plasticity Network paper (Aitken & Mihalas, eLife 2023), as
# NeuroGym 2.3.1 registers it (the paper's SingleContextDecisionMaking is not registered).
# ``python main.py sweep --battery`` trains on these.
BATTERY = tuple(f"{name}-v0" for name in (
    "ContextDecisionMaking DelayComparison DelayMatchCategory DelayMatchSample "
    "DelayMatchSampleDistractor1D DelayPairedAssociation DualDelayMatchSample GoNogo "
    "HierarchicalReasoning IntervalDiscrimination MotorTiming MultiSensoryIntegration "
    "OneTwoThreeGo ReadySetGo PerceptualDecisionMaking "
    "PerceptualDecisionMakingDelayResponse ProbabilisticReasoning PulseDecisionMaking").split())


class UnknownTaskError(ValueError):
    """The task name is not a registered NeuroGym task; the message lists close matches."""


class TaskError(ValueError):
    """The task cannot be trained as asked (not a trial-based task, or a dt it cannot run at);
    the message says what to do instead."""


# Periods in which NeuroGym tasks take an answer (the response window), first one wins.
RESPONSE_PERIODS = ("decision", "test", "test1", "production", "response")
# Tasks whose reward for an answer is graded: a produced interval within NeuroGym's margin
# (|t - target| <= 0.2 target + 25 ms) pays between 0.1 and 1, outside it 0.  Correct = paid.
GRADED_REWARD_TASKS = frozenset({"MotorTiming-v0", "ReadySetGo-v0", "OneTwoThreeGo-v0"})
# Tasks that pay no reward at all: the action at the trial's last step is the answer.
UNREWARDED_TASKS = frozenset({"ToneDetection-v0"})
# Tasks that ask for an answer in two windows and whose final reward scores only the second
# (DualDelayMatchSample pays each right answer in test1 and ends the trial on the answer in
# test2): correct needs both.
TWO_ANSWER_TASKS = frozenset({"DualDelayMatchSample-v0"})


class TrialOutcome:
    """Scores finished trials of one task.

    A trial is correct when

    * the reward of its last step is the task's ``correct`` reward (most tasks: the answer in
      the response window was right);
    * for tasks with graded rewards (MotorTiming, ReadySetGo, OneTwoThreeGo) that reward is
      positive, i.e. the produced interval fell within NeuroGym's margin;
    * for a trial in which no answer is due at any step (a no-go trial of GoNogo, a non-match
      trial of DelayPairedAssociation), the agent withheld: its last
      action is fixate and its last reward is not negative;
    * for ToneDetection, which pays no reward, the last action equals the trial's ground truth.
    * for DualDelayMatchSample, which asks twice (test1, then test2), both answers must be
      right: in the first window of steps with an answer due the agent answered at least once
      and every answer there was right, and the final reward is the correct one.

    A fixation break is a step that earned the task's ``abort`` penalty.  A premature response
    is any non-fixate action before the trial's response window: the first step whose answer
    is not fixate or, where no answer is due, the start of the first of
    :data:`RESPONSE_PERIODS` the trial has (ToneDetection: its last step).
    """

    def __init__(self, env_name: str, unwrapped):
        rewards = getattr(unwrapped, "rewards", None) or {}
        self.correct_reward = float(rewards.get("correct", 1.0))
        abort = rewards.get("abort")
        self.abort_reward = float(abort) if abort is not None and abort < 0 else None
        self.graded = env_name in GRADED_REWARD_TASKS
        self.unrewarded = env_name in UNREWARDED_TASKS
        self.two_answers = env_name in TWO_ANSWER_TASKS

    def correct(self, actions: np.ndarray, rewards: np.ndarray, gt: np.ndarray,
                ground_truth: int) -> bool:
        last_a, last_r = int(actions[-1]), float(rewards[-1])
        if self.unrewarded:
            return last_a == int(ground_truth)
        if last_r >= self.correct_reward - 1e-6:
            return not self.two_answers or _first_window_right(actions, gt)
        if self.graded:
            return last_r > 1e-6
        return bool(not gt.any() and last_a == 0 and last_r >= 0)

    def response_start(self, unwrapped) -> int:
        """The response window's first step of the trial the env holds now (for a task that
        pays no reward, its last step: only the last action counts)."""
        gt = np.asarray(unwrapped.gt)
        if self.unrewarded:
            return max(0, int(len(gt)) - 1)
        due = np.flatnonzero(gt.reshape(len(gt), -1).any(axis=1)) if gt.size else []
        if len(due):
            return int(due[0])
        start = getattr(unwrapped, "start_ind", {}) or {}
        for p in RESPONSE_PERIODS:
            if p in start:
                return int(start[p])
        return int(len(gt))


def _first_window_right(actions: np.ndarray, gt: np.ndarray) -> bool:
    """In the first run of steps with an answer due: at least one answer, every answer right."""
    due = np.asarray(gt).reshape(len(gt), -1).any(axis=1)
    starts = np.flatnonzero(due & ~np.r_[False, due[:-1]])
    if len(starts) < 2:
        return True                      # one window only: the final reward decides
    end = starts[0] + int(np.argmin(due[starts[0]:]))      # the first step after the window
    a, g = np.asarray(actions)[starts[0]:end], np.asarray(gt).reshape(len(gt))[starts[0]:end]
    answered = a != 0
    return bool(answered.any() and (a[answered] == g[answered]).all())


def ideal_accuracy(env_name: str, dt: int) -> float | None:
    return IDEAL_ACCURACY.get((env_name, int(dt)))


def pct_of_ideal(accuracy: float | None, env_name: str, dt: int) -> float | None:
    """Accuracy as a percentage of the ideal observer's; None when the ceiling is unknown or is
    chance itself (nothing can be learned, so a percentage would only mislead)."""
    ideal = ideal_accuracy(env_name, dt)
    if accuracy is None or ideal is None or ideal <= CHANCE_ACCURACY.get(env_name, 0.0):
        return None
    return 100.0 * accuracy / ideal


def _quiet_imports():
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import gymnasium
        import neurogym  # noqa: F401  (registers the tasks)
    return gymnasium


def neurogym_task_names() -> list[str]:
    gym = _quiet_imports()
    names = []
    for name, spec in gym.envs.registry.items():
        ep = str(spec.entry_point)
        if "neurogym" in ep:
            names.append(name)
    return sorted(names)


def check_task_name(env_name: str) -> None:
    names = neurogym_task_names()
    if env_name in names:
        return
    close = difflib.get_close_matches(env_name, names, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known tasks include {', '.join(names[:8])}, ..."
    raise UnknownTaskError(f"--env-name {env_name!r} is not a NeuroGym task; {hint}")


@functools.lru_cache(maxsize=None)
def native_dt(env_name: str) -> int:
    """The task's own time step in ms (the ``dt`` its registration uses by default)."""
    gym = _quiet_imports()
    check_task_name(env_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            env = gym.make(env_name)
        except Exception as exc:  # noqa: BLE001  (NeuroGym's own refusal, any type)
            raise TaskError(f"{env_name} cannot be made with its registered defaults "
                            f"({str(exc).splitlines()[0][:160]})") from None
    dt = env.unwrapped.dt
    env.close()
    return int(round(float(dt)))


def _asks_for_answers(u, trials: int = 20) -> bool:
    for _ in range(trials):
        u.new_trial()
        gt = getattr(u, "gt", None)
        if gt is not None and np.asarray(gt).any():
            return True
    return False


def _empty_periods(env, trials: int = 30) -> set[str]:
    u = env.unwrapped
    empty = set()
    for _ in range(trials):
        u.new_trial()
        empty |= {p for p in u.start_ind if u.end_ind[p] <= u.start_ind[p]}
    return empty


@functools.lru_cache(maxsize=None)
def check_task(env_name: str, dt: int) -> None:
    """Refuse (:class:`TaskError`) what cannot be trained: an env that is not a trial-based task
    with a discrete answer (e.g. ``Null-v0``), a dt the task refuses, or a dt coarser than the
    task's own at which some of its periods last zero steps (e.g. PulseDecisionMaking's 10 ms
    pulses at dt 100)."""
    gym = _quiet_imports()
    check_task_name(env_name)
    own = native_dt(env_name)
    from neurogym.core import TrialEnv
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            env = gym.make(env_name, dt=dt)
            env.reset(seed=0)
        except Exception as exc:  # noqa: BLE001  (NeuroGym's own refusal, any type)
            msg = str(exc).splitlines()[0].rstrip(". ") if str(exc) else type(exc).__name__
            raise TaskError(f"{env_name} cannot run at dt {dt} ms ({msg}); its own dt is "
                            f"{own} ms: omit --dt or choose one the task accepts") from None
        u = env.unwrapped
        space, obs = env.action_space, env.observation_space
        if (not isinstance(u, TrialEnv) or not hasattr(space, "n") or int(space.n) < 2
                or len(getattr(obs, "shape", ()) or ()) != 1):
            env.close()
            raise TaskError(f"{env_name} is not a trial-based task with a discrete answer "
                            "(mpn-dqn needs a NeuroGym TrialEnv with a 1-D observation and at "
                            "least two actions)")
        if not _asks_for_answers(u):
            env.close()
            raise TaskError(f"{env_name} asks for no answer in any trial (it has no ground "
                            "truth other than fixate): mpn-dqn cannot score it")
        empty = _empty_periods(env)
        env.close()
        if dt > own and empty:
            ref = gym.make(env_name)
            lost = sorted(empty - _empty_periods(ref))
            ref.close()
            if lost:
                raise TaskError(f"{env_name} at dt {dt} ms: its period(s) {', '.join(lost[:6])} "
                                f"last zero steps (they are resolved at its own dt, {own} ms); "
                                f"omit --dt or use --dt {own} or less")


def make_env(env_name: str, dt: int, seed: int | None = None):
    """A NeuroGym env with trials reproducible from ``seed`` (``env.unwrapped.seed``)."""
    gym = _quiet_imports()
    check_task_name(env_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make(env_name, dt=dt)
    if seed is not None:
        env.unwrapped.seed(int(seed))
    return env


def task_dims(env_name: str, dt: int) -> tuple[int, int]:
    """(obs_dim, num_actions) of a task."""
    env = make_env(env_name, dt)
    obs_dim = int(env.observation_space.shape[0])
    num_actions = int(env.action_space.n)
    env.close()
    return obs_dim, num_actions
