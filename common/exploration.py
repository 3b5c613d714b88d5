"""ε-greedy exploration in task time, and its spread over actors.

ε is a probability of a random action per 100 ms of task time; it decays linearly over
``decay_steps`` × 100 ms of task time (env steps summed over all envs at dt 100), then stays at
its end value.  :func:`epsilon_per_step` converts it to the per-step probability at a task's dt.
With several actors, actor i of n explores with ε^(1 + α·i/(n-1)) (the Ape-X spread).
"""
from __future__ import annotations


def epsilon_at(env_steps: int, start: float, end: float, decay_steps: int, dt: int = 100) -> float:
    """ε per 100 ms of task time after ``env_steps`` steps of ``dt`` ms: a linear decay over
    ``decay_steps`` × 100 ms of task time (env steps at dt 100), then constant."""
    frac = min(1.0, env_steps * (dt / 100.0) / max(1, decay_steps))
    return start + (end - start) * frac


def epsilon_per_step(epsilon: float, dt: int) -> float:
    """The per-step probability of a random action that explores as often per unit of task time
    as ``epsilon`` per 100 ms: 1 - (1 - ε)^(dt/100); the same at dt 100, ~ε/10 at dt 10 (where
    ε per step would break a 1 s fixation in most exploring trials)."""
    return 1.0 - (1.0 - epsilon) ** (dt / 100.0)


def actor_epsilon(base: float, actor_id: int, num_actors: int, alpha: float = 1.0) -> float:
    """Ape-X style: actor i explores with ``base ** (1 + alpha * i / (N - 1))`` (actor 0 uses
    the schedule itself, the others explore less)."""
    if num_actors <= 1 or base <= 0:
        return base
    return base ** (1.0 + alpha * actor_id / (num_actors - 1))
