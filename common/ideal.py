"""Observation-only ideal observers of noisy tasks: the best accuracy an agent can reach.

Each observer sees one trial's observations (what the agent sees) and the task's rules — its
priors and noise model, but not the trial's hidden draws — and returns the probability that its
Bayes-optimal answer is correct.  The mean of that probability over sampled trials is the ideal
observer's accuracy (an unbiased estimate with a smaller variance than scoring its answers).
Where the oracle, which reads the ground truth, scores higher, the difference is the part of
the task no agent can learn: noise, ties, or a ground truth drawn at random from the evidence.

- PulseDecisionMaking: the answer is the side with more pulses; with equal counts it is drawn
  at random (NeuroGym adds U(-0.1, 0.1) to one count), so a tie is a coin flip.
- ProbabilisticReasoning: the shapes shown fix the log-odds of the answer, which is then drawn
  with that probability; the best answer is the more likely one, right with max(p, 1 - p).
- IntervalDiscrimination: the answer is the longer of two intervals; the agent sees each as a
  number of steps, so intervals that round to the same count are a coin flip.
- HierarchicalReasoning: the rule (which the agent must report in the rule period and which
  decides the right choice) alternates in blocks of 10-20 trials and is never shown: both rule
  channels read 1 alike.  An agent that sees observations (and no rewards) has a posterior of
  one half on the rule in every trial, so the best it can do is 0.5.
- PerceptualDecisionMakingDelayResponse: two noisy channels during the stimulus, the stronger
  one the answer, at a coherence drawn from five (0 %: the answer is a coin flip); the sum of
  their difference over the stimulus is sufficient, and the posterior sums over the coherences.
- DelayMatchSampleDistractor1D: the sample and the tests are shown without noise (NeuroGym
  keeps ``sigma`` but adds no noise), so the test whose pattern equals the sample's is the match
  and a distractor (a uniform random angle) never equals it: 1.0.
- MultiSensoryIntegration: two noisy modalities, each a cosine bump of unknown strength
  (coherence 5, 15 or 50 split at random between them); the posterior integrates over
  that split on a grid.
"""
from __future__ import annotations

import numpy as np


def _pulses(env) -> float:
    ob = np.asarray(env.ob)
    n1, n2 = ob[:, 1].sum(), ob[:, 2].sum()
    return 0.5 if np.isclose(n1, n2) else 1.0


def _probabilistic(env) -> float:
    p = 1.0 / (10.0 ** (-float(env.trial["log_odd"])) + 1.0)
    return max(p, 1.0 - p)


def _intervals(env) -> float:
    ob = np.asarray(env.ob)
    return 0.5 if np.isclose(ob[:, 1].sum(), ob[:, 2].sum()) else 1.0


def _hierarchical(env) -> float:
    ob = np.asarray(env.ob)
    rule = ob[env.start_ind["rule_target"]:env.end_ind["rule_target"], 1:3]
    if rule.size and not np.allclose(rule[:, 0], rule[:, 1]):
        raise ValueError("HierarchicalReasoning shows the rule here; the observer assumes it does not")
    return 0.5


def _pdm_delay(env) -> float:
    ob = np.asarray(env.ob, dtype=np.float64)
    stim = ob[env.start_ind["stimulus"]:env.end_ind["stimulus"]]
    T = stim.shape[0]
    d = (stim[:, 2] - stim[:, 1]).sum()              # evidence for answer 2 (channel 2)
    var = 2.0 * T * float(env.sigma) ** 2             # of d, given the coherence
    mu = T * np.asarray(env.cohs, np.float64) / 100.0
    lp2 = -((d - mu) ** 2) / (2 * var)               # answer 2, each coherence equally likely
    lp1 = -((d + mu) ** 2) / (2 * var)
    m = max(lp1.max(), lp2.max())
    a, b = np.exp(lp2 - m).sum(), np.exp(lp1 - m).sum()
    return float(max(a, b) / (a + b))


def _distractor_1d(env) -> float:
    ob = np.asarray(env.ob)
    start, end = env.start_ind, env.end_ind
    sample = ob[start["sample"]:end["sample"], 1:]
    tests = [ob[start[f"test{i}"]:end[f"test{i}"], 1:] for i in (1, 2, 3)]
    if not np.allclose(sample, sample[0]) or any(not np.allclose(t, t[0]) for t in tests):
        raise ValueError("DelayMatchSampleDistractor1D shows noise here; the observer assumes none")
    same = [bool(np.array_equal(t[0], sample[0])) for t in tests]
    return 1.0 if same.count(True) == 1 and same.index(True) + 1 == env.trial["ground_truth"] else 0.0


_PROP_GRID = (np.arange(200) + 0.5) / 200          # coh_prop ~ U(0, 1)


def _multisensory(env) -> float:
    ob = np.asarray(env.ob, dtype=np.float64)
    stim = ob[env.start_ind["stimulus"]:env.end_ind["stimulus"]]
    ring = (ob.shape[1] - 1) // 2
    if ring != 2:
        raise ValueError("the MultiSensoryIntegration observer assumes dim_ring = 2")
    s2 = float(env.sigma) ** 2
    T = stim.shape[0]
    d1 = (stim[:, 1] - stim[:, 2]).sum()              # modality 1: unit 0 minus unit 1
    d2 = (stim[:, 3] - stim[:, 4]).sum()
    logs = []
    for coh in env.cohs:                               # each coherence equally likely
        a1, a2 = coh * _PROP_GRID / 200.0, coh * (1.0 - _PROP_GRID) / 200.0
        common = -T * (a1 ** 2 + a2 ** 2) / s2
        logs.append(np.stack([common + (a1 * d1 + a2 * d2) / s2,      # answer 0 (theta 0)
                              common - (a1 * d1 + a2 * d2) / s2]))    # answer 1 (theta pi)
    logs = np.concatenate(logs, axis=1)
    m = logs.max()
    like = np.exp(logs - m).sum(axis=1)
    return float(like.max() / like.sum())


OBSERVERS = {
    "PulseDecisionMaking-v0": _pulses,
    "ProbabilisticReasoning-v0": _probabilistic,
    "IntervalDiscrimination-v0": _intervals,
    "MultiSensoryIntegration-v0": _multisensory,
    "HierarchicalReasoning-v0": _hierarchical,
    "PerceptualDecisionMakingDelayResponse-v0": _pdm_delay,
    "DelayMatchSampleDistractor1D-v0": _distractor_1d,
}


def has_observer(env_name: str) -> bool:
    return env_name in OBSERVERS


def observe(env_name: str, dt: int, trials: int = 2000, seed: int = 0) -> dict:
    """The ideal observer's accuracy (mean over ``trials`` sampled trials) and its stderr."""
    from mpn_dqn.common.tasks import make_env
    env = make_env(env_name, dt, seed=seed)
    u = env.unwrapped
    fn = OBSERVERS[env_name]
    vals = np.empty(trials)
    for i in range(trials):
        u.new_trial()
        vals[i] = fn(u)
    return {"accuracy": float(vals.mean()), "stderr": float(vals.std(ddof=1) / np.sqrt(trials))}
