"""The ceiling command: scripted policies on real NeuroGym envs, scored like the agent."""
import json

import numpy as np
import pytest

from mpn_dqn.common.ceiling import ceiling_for, learnable, pct_of_ceiling, run_policy
from mpn_dqn.driver.cli.parser import main


def test_ceiling_json_reports_every_policy_and_uses_the_ideal_observer_where_known(capsys):
    rc = main(["ceiling", "--env-name", "PerceptualDecisionMaking-v0", "--trials", "300", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1
    res = json.loads(out[0])
    for key in ("env_name", "dt", "trials", "random", "oracle", "ideal", "ceiling"):
        assert key in res
    assert res["dt"] == 100                         # the task's own dt
    assert res["oracle"]["accuracy"] == 1.0         # noise-free rules: the oracle is always right
    assert res["ceiling_source"] == "ideal observer" and res["ceiling"] == pytest.approx(0.896)
    assert res["fixate"]["accuracy"] == 0.0
    assert 0.4 < res["frequent"]["accuracy"] < 0.6   # two answers, equally often due
    assert res["random"]["accuracy"] < 0.45          # random actions mostly break the 1-step window


def test_where_no_ideal_observer_is_known_the_oracle_is_the_ceiling_and_withholding_counts():
    res = ceiling_for("GoNogo-v0", 100, trials=300)
    assert res["ideal"] is None and res["ceiling_source"] == "oracle" and res["ceiling"] == 1.0
    assert res["best_trivial"]["policy"] in ("fixate", "frequent")
    assert 0.4 < res["best_trivial"]["accuracy"] < 0.6
    assert pct_of_ceiling(0.42, res) == pytest.approx(42.0)


def test_a_task_whose_ceiling_is_chance_gets_no_percentage(capsys):
    res = ceiling_for("DelayMatchCategory-v0", 100, trials=300)
    assert not learnable(res) and pct_of_ceiling(0.5, res) is None
    rc = main(["ceiling", "--env-name", "DelayMatchCategory-v0", "--trials", "300"])
    assert rc == 0 and "nothing can be learned" in capsys.readouterr().out


def test_timing_tasks_reward_only_a_produced_interval():
    assert run_policy("ReadySetGo-v0", 80, "oracle", 100)["accuracy"] == 1.0
    assert run_policy("ReadySetGo-v0", 80, "fixate", 100)["accuracy"] == 0.0


@pytest.mark.parametrize("argv,words", [
    (["--env-name", "PerceptualDecisionMaking-v0", "--trials", "0"], "--trials must be >= 1"),
    (["--env-name", "ToneDetection-v0", "--dt", "100"], "its own dt is 50 ms"),
    (["--env-name", "Null-v0"], "not a trial-based task"),
])
def test_ceiling_misuse_is_one_line_and_exit_2(argv, words, capsys):
    rc = main(["ceiling", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and words in err and "\n" not in err


def test_ideal_observers_of_noisy_tasks_match_their_closed_forms():
    """PulseDecisionMaking: a tie in pulse counts is a coin flip, so the ideal observer scores
    1 - P(tie)/2; ProbabilisticReasoning: E[max(p, 1 - p)] over the shapes shown."""
    import itertools
    from math import comb
    from mpn_dqn.common.ideal import observe
    bino = lambda k, n, p: comb(n, k) * p ** k * (1 - p) ** (n - k)   # noqa: E731
    p_tie = sum(bino(k, 6, 0.3) * bino(k, 6, 0.7) for k in range(7))
    r = observe("PulseDecisionMaking-v0", 10, trials=1500, seed=3)
    assert abs(r["accuracy"] - (1 - p_tie / 2)) < 4 * r["stderr"] + 1e-3, (r, 1 - p_tie / 2)
    w = [-10, -0.9, -0.7, -0.5, -0.3, 0.3, 0.5, 0.7, 0.9, 10]
    exact = np.mean([max(p, 1 - p) for p in
                     (1 / (10 ** (-sum(c)) + 1) for c in itertools.product(w, repeat=4))])
    r = observe("ProbabilisticReasoning-v0", 100, trials=1500, seed=3)
    assert abs(r["accuracy"] - exact) < 4 * r["stderr"] + 1e-3, (r, exact)


def _observer_vs_rule(env_name: str, observer, answer, trials: int, seed: int):
    """Per trial: the observer's posterior accuracy and whether a simple rule's answer (from the
    stimulus observations) is right, on the same sampled trials."""
    from mpn_dqn.common.tasks import make_env
    u = make_env(env_name, 100, seed=seed).unwrapped
    post, hit = [], []
    for _ in range(trials):
        u.new_trial()
        post.append(observer(u))
        stim = np.asarray(u.ob)[u.start_ind["stimulus"]:u.end_ind["stimulus"]]
        hit.append(float(answer(stim) == u.trial["ground_truth"]))
    return np.array(post), np.array(hit)


def test_the_multisensory_bayes_observer_beats_summing_the_modalities():
    """Its posterior accuracy must be at least that of answering by the sign of the summed
    evidence of both modalities, scored on the same trials, and below the oracle's 1.0."""
    from mpn_dqn.common.ideal import _multisensory
    post, naive = _observer_vs_rule(
        "MultiSensoryIntegration-v0", _multisensory,
        lambda st: 0 if (st[:, 1] - st[:, 2]).sum() + (st[:, 3] - st[:, 4]).sum() > 0 else 1, 1500, 4)
    assert naive.mean() - 0.02 <= post.mean() < 0.97


def test_hierarchical_reasoning_never_shows_its_rule_so_its_ceiling_is_one_half():
    """The rule decides the answer but both rule channels read alike in every trial (the observer
    raises otherwise), so without rewards as input nothing beats a coin flip on the rule."""
    from mpn_dqn.common.ideal import observe
    assert observe("HierarchicalReasoning-v0", 100, trials=400, seed=2)["accuracy"] == 0.5


def test_the_delayed_response_observer_predicts_its_own_accuracy():
    """The posterior's expected accuracy must match the accuracy its answers (the sign of the
    summed evidence) actually score on the same trials."""
    from mpn_dqn.common.ideal import _pdm_delay
    post, hit = _observer_vs_rule("PerceptualDecisionMakingDelayResponse-v0", _pdm_delay,
                                  lambda st: 2 if (st[:, 2] - st[:, 1]).sum() > 0 else 1, 2000, 6)
    se = np.sqrt(hit.var() / len(hit))
    assert abs(post.mean() - hit.mean()) < 3 * se + 0.005, (post.mean(), hit.mean())


def test_the_distractor_task_shows_no_noise_so_its_ideal_observer_is_perfect():
    """DelayMatchSampleDistractor1D: the test equal to the sample is the match, every trial."""
    from mpn_dqn.common.ideal import observe
    assert observe("DelayMatchSampleDistractor1D-v0", 100, trials=300)["accuracy"] == 1.0
    res = ceiling_for("DelayMatchSampleDistractor1D-v0", 100, trials=300)
    assert res["ceiling_source"] == "ideal observer" and res["ceiling"] == 1.0
