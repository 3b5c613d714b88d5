"""What a perfect and a trivial agent score on a task: the ceiling and the floor of accuracy.

:func:`measure` runs scripted policies through real NeuroGym envs and scores every trial with
:class:`common.tasks.TrialOutcome` (the same rule as training and ``eval``):

* ``random``: a uniformly random action at every step;
* ``oracle``: the ground truth at every step (``env.unwrapped.gt_now``, privileged). On a task
  whose rules are right it scores 1.0;
* ``fixate``: always fixate (withholding: ~0.5 on go/no-go tasks);
* ``frequent``: fixate through the fixation period, then give the most frequent answer at
  every step (the answer most often due over a sample of trials).

The ceiling is the observation-only ideal observer where one is known
(:data:`common.tasks.IDEAL_ACCURACY`, or the Bayes observers of noisy tasks in
:mod:`common.ideal`), else the oracle, and the result says which.  The best
trivial policy is the better of ``fixate`` and ``frequent``: an agent that does not beat it
has learned nothing.  Results are cached per task, dt, trial count and seed in
``$MPN_DQN_CACHE_DIR/ceilings.json`` (default ``~/.cache/mpn-dqn``).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from mpn_dqn.common.tasks import TrialOutcome, ideal_accuracy, make_env

POLICIES = ("random", "oracle", "fixate", "frequent")
RULES_VERSION = 6          # bump when TrialOutcome or a policy changes: old cache rows are ignored


def run_policy(env_name: str, dt: int, policy: str, trials: int, seed: int = 0,
               answer: int = 1) -> dict:
    """Accuracy, its standard error, and the premature-response rate of a scripted policy over
    ``trials`` trials (the spoiled first trial after reset is not counted)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    env = make_env(env_name, dt, seed=seed)
    u = env.unwrapped
    env.reset(seed=seed)
    outcome = TrialOutcome(env_name, u)
    rng = np.random.default_rng(seed)
    n_actions = int(env.action_space.n)
    acts, rews, scores, early, first = [], [], [], [], True
    gt_seq, truth, resp = u.gt, u.trial.get("ground_truth", -1), outcome.response_start(u)
    while len(scores) < trials:
        if policy == "oracle":
            a = int(u.gt_now)
        elif policy == "random":
            a = int(rng.integers(n_actions))
        elif policy == "fixate" or (policy == "frequent" and "fixation" in u.start_t
                                     and u.in_period("fixation")):
            a = 0
        else:
            a = answer
        _, r, _, _, info = env.step(a)
        acts.append(a)
        rews.append(r)
        if info["new_trial"]:
            if not first:
                A, R = np.array(acts), np.array(rews)
                scores.append(outcome.correct(A, R, np.asarray(gt_seq)[:len(A)], truth))
                early.append(bool(A[:resp].any()))
            first = False
            acts, rews = [], []
            gt_seq, truth, resp = u.gt, u.trial.get("ground_truth", -1), outcome.response_start(u)
    env.close()
    acc = float(np.mean(scores))
    return {"accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / trials),
            "premature_rate": float(np.mean(early))}


def most_frequent_answer(env_name: str, dt: int, trials: int = 500, seed: int = 0) -> int:
    """The non-fixate answer most often due, over the steps of ``trials`` sampled trials."""
    u = make_env(env_name, dt, seed=seed).unwrapped
    counts: dict[int, int] = {}
    for _ in range(trials):
        u.new_trial()
        for g in np.asarray(u.gt).ravel().tolist():
            if g:
                counts[int(g)] = counts.get(int(g), 0) + 1
    return max(counts, key=lambda g: (counts[g], -g)) if counts else 1


def measure(env_name: str, dt: int, trials: int = 2000, seed: int = 0) -> dict:
    """Every scripted policy's accuracy on the task, the ideal observer where known, the
    ceiling and the best trivial policy (see the module docstring)."""
    answer = most_frequent_answer(env_name, dt, seed=seed)
    res = {p: run_policy(env_name, dt, p, trials, seed=seed + i, answer=answer)
           for i, p in enumerate(POLICIES)}
    known = ideal_accuracy(env_name, dt)
    from mpn_dqn.common.ideal import has_observer, observe
    if known is not None:
        ideal = {"accuracy": known, "stderr": None}
    elif has_observer(env_name):           # noisy tasks: the Bayes observer of common/ideal.py
        ideal = observe(env_name, dt, trials, seed=seed + len(POLICIES))
    else:
        ideal = None
    trivial = max(("fixate", "frequent"), key=lambda p: res[p]["accuracy"])
    ceiling = ideal["accuracy"] if ideal is not None else res["oracle"]["accuracy"]
    return {
        "env_name": env_name, "dt": int(dt), "trials": int(trials), "seed": int(seed),
        **res, "frequent_answer": int(answer),
        "ideal": ideal,
        "ceiling": ceiling, "ceiling_source": "ideal observer" if ideal is not None else "oracle",
        "best_trivial": {"policy": trivial, "accuracy": res[trivial]["accuracy"]},
    }


def cache_path() -> Path:
    root = os.environ.get("MPN_DQN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                "mpn-dqn")
    return Path(root) / "ceilings.json"


def _key(env_name: str, dt: int, trials: int, seed: int) -> str:
    return f"{env_name}|dt={int(dt)}|trials={int(trials)}|seed={int(seed)}|rules={RULES_VERSION}"


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}                 # missing or damaged: measured again and rewritten


_MEMO: dict[str, dict] = {}


def ceiling_for(env_name: str, dt: int, trials: int = 1000, seed: int = 0) -> dict:
    """:func:`measure`, computed once per task + dt + trials + seed and cached on disk."""
    key = _key(env_name, dt, trials, seed)
    if key in _MEMO:
        return _MEMO[key]
    row = _read_cache().get(key)
    if not (isinstance(row, dict) and isinstance(row.get("ceiling"), (int, float))
            and isinstance(row.get("best_trivial"), dict)):
        row = measure(env_name, dt, trials, seed)
        try:
            path = cache_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            data = _read_cache()
            data[key] = row
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError:
            pass                  # an unwritable cache costs a re-measurement, nothing else
    _MEMO[key] = row
    return row


def learnable(ceiling: dict) -> bool:
    """The ceiling lies more than three standard errors (and 0.01) above the best trivial
    policy."""
    bt = ceiling["best_trivial"]
    se = ceiling[bt["policy"]]["stderr"]
    return ceiling["ceiling"] > bt["accuracy"] + 3 * se + 0.01


def pct_of_ceiling(accuracy: float | None, ceiling: dict | None) -> float | None:
    """Accuracy as % of the ceiling; None where the ceiling does not rise clearly above the
    best trivial policy (the task cannot be learned as registered, a percentage would
    mislead)."""
    if accuracy is None or not ceiling or not learnable(ceiling):
        return None
    top = ceiling["ceiling"]
    return 100.0 * accuracy / top
