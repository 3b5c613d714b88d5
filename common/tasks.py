"""NeuroGym task vocabulary: making envs, checking names, and accuracy ceilings.

Ceilings are the ideal-observer accuracies from ``shared/neurogym-notes.md`` (measured or
analytic, per dt).  For a task or dt not listed we return ``None`` and say so — we never
invent a ceiling.
"""
from __future__ import annotations

import difflib
import os
import warnings

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


class UnknownTaskError(ValueError):
    """The task name is not a registered NeuroGym task; the message lists close matches."""


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
