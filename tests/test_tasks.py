"""Facts about NeuroGym tasks that the accuracy ceilings in common/tasks.py rest on."""
import numpy as np
import pytest

from mpn_dqn.common.tasks import ideal_accuracy, make_env


def test_delay_match_category_hides_the_category_so_its_ceiling_is_chance():
    """With dim_ring = 2 the sample's observations have one distribution for both categories:
    an observer cannot tell the categories apart, so match/non-match is a coin flip."""
    u = make_env("DelayMatchCategory-v0", 100, seed=3).unwrapped
    assert _category_distance(u) < 0.06          # KS ~ 1.4/sqrt(n/2) when nothing differs
    # the same statistic separates the categories at once when the ring has 3 channels
    import warnings

    import gymnasium
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # gymnasium's note on NeuroGym's metadata
        u3 = gymnasium.make("DelayMatchCategory-v0", dt=100, dim_ring=3).unwrapped
    u3.seed(3)
    assert _category_distance(u3) > 0.3
    assert ideal_accuracy("DelayMatchCategory-v0", 100) == 0.5


def _category_distance(u, n=3000) -> float:
    """Largest two-sample Kolmogorov-Smirnov distance, over stimulus channels, between the
    mean sample-period observations of category-0 and category-1 trials."""
    means = {0: [], 1: []}
    for _ in range(n):
        trial = u.new_trial()
        a, b = u.start_ind["sample"], u.end_ind["sample"]
        means[trial["sample_category"]].append(u.ob[a:b, 1:].mean(axis=0))
    m0, m1 = np.array(means[0]), np.array(means[1])
    dist = 0.0
    for c in range(m0.shape[1]):
        x0, x1 = np.sort(m0[:, c]), np.sort(m1[:, c])
        grid = np.concatenate([x0, x1])
        d = np.abs(np.searchsorted(x0, grid, side="right") / len(x0)
                   - np.searchsorted(x1, grid, side="right") / len(x1)).max()
        dist = max(dist, float(d))
    return dist


def test_percent_of_ideal_only_where_a_ceiling_above_chance_is_known():
    from mpn_dqn.common.tasks import pct_of_ideal
    assert pct_of_ideal(0.448, "PerceptualDecisionMaking-v0", 100) == pytest.approx(50.0)
    assert pct_of_ideal(0.5, "DelayMatchCategory-v0", 100) is None      # the ceiling is chance
    assert pct_of_ideal(0.9, "GoNogo-v0", 100) is None                  # no ceiling known


# --- native timing, refusals and trial outcomes -------------------------------------------

from mpn_dqn.common.tasks import TaskError, check_task, native_dt  # noqa: E402


def test_native_dt_is_the_tasks_own_and_the_config_defaults_to_it():
    from mpn_dqn.common.config import TrainConfig
    assert native_dt("PulseDecisionMaking-v0") == 10
    assert native_dt("ReadySetGo-v0") == 80
    assert native_dt("ToneDetection-v0") == 50
    assert TrainConfig(env_name="PulseDecisionMaking-v0").dt == 10
    assert TrainConfig(env_name="PulseDecisionMaking-v0", dt=20).dt == 20


@pytest.mark.parametrize("env_name,dt,words", [
    ("ToneDetection-v0", 100, "its own dt is 50 ms"),
    ("PulseDecisionMaking-v0", 100, "cue0"),
    ("ReadySetGo-v0", 100, "use --dt 80 or less"),
    ("Null-v0", 100, "not a trial-based task"),
    ("Bandit-v0", 100, "asks for no answer"),
])
def test_tasks_that_cannot_be_trained_as_asked_are_refused_with_a_reason(env_name, dt, words):
    with pytest.raises(TaskError, match=words):
        check_task(env_name, dt)


def test_every_task_runs_at_its_own_dt():
    for name in ("PulseDecisionMaking-v0", "ToneDetection-v0", "MotorTiming-v0", "GoNogo-v0"):
        check_task(name, native_dt(name))


def _scripted_accuracy(env_name: str, policy: str, trials: int = 120, seed: int = 1):
    """Accuracy and premature-response rate of a scripted policy scored by TrialOutcome."""
    from mpn_dqn.common.ceiling import run_policy
    res = run_policy(env_name, native_dt(env_name), policy, trials, seed=seed)
    return res["accuracy"], res["premature_rate"]


@pytest.mark.parametrize("env_name", ["ReadySetGo-v0", "MotorTiming-v0", "GoNogo-v0",
                                      "DelayPairedAssociation-v0", "DelayMatchSampleDistractor1D-v0",
                                      "PerceptualDecisionMaking-v0", "HierarchicalReasoning-v0"])
def test_the_oracle_is_always_correct_and_fixating_is_not_on_tasks_that_need_an_answer(env_name):
    """The definition of correct is right for a task when the ground-truth oracle scores 1.0;
    on timing tasks an agent that never presses must score 0 (an earlier rule that counted a
    fixate at a trial's last step as a withhold scored it 1.0 on MotorTiming and 0.65 on
    DelayMatchSampleDistractor1D, whose every trial holds a match)."""
    acc, early = _scripted_accuracy(env_name, "oracle")
    assert acc == 1.0
    assert early == 0.0
    fixate, _ = _scripted_accuracy(env_name, "fixate")
    if env_name in ("GoNogo-v0", "DelayPairedAssociation-v0"):
        assert 0.2 < fixate < 0.8            # withholding is right on the no-go / non-match trials
    else:
        assert fixate == 0.0


def test_answering_through_the_stimulus_counts_as_premature():
    """The most-frequent-answer policy answers from the end of fixation on."""
    _, early = _scripted_accuracy("PerceptualDecisionMaking-v0", "frequent")
    assert early == 1.0


def test_dual_delay_match_sample_is_correct_only_when_both_answers_are_right():
    """Its final reward scores only the answer in test2; the answer in test1 must be right too."""
    from mpn_dqn.common.tasks import TrialOutcome
    env = make_env("DualDelayMatchSample-v0", 100, seed=0)
    u = env.unwrapped
    env.reset(seed=0)
    out = TrialOutcome("DualDelayMatchSample-v0", u)
    gt = np.asarray(u.gt)
    first = np.flatnonzero(gt != 0)[0]
    rewards = np.zeros(len(gt))
    rewards[-1] = out.correct_reward                   # test2 answered right at the last step
    oracle = gt.copy()
    assert out.correct(oracle, rewards, gt, 0)
    wrong_first = oracle.copy()
    wrong_first[first] = 3 - gt[first]                 # the other of match (1) / non-match (2)
    assert not out.correct(wrong_first, rewards, gt, 0)
    silent_first = np.where(np.arange(len(gt)) < len(gt) - 1, 0, gt)   # test1 never answered
    assert not out.correct(silent_first, rewards, gt, 0)
    late_right = oracle.copy()
    late_right[first] = 0                              # fixating on some steps of test1 is fine
    assert out.correct(late_right, rewards, gt, 0)
