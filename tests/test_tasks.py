"""Facts about NeuroGym tasks that the accuracy ceilings in common/tasks.py rest on."""
import numpy as np
import pytest

from common.tasks import ideal_accuracy, make_env


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
    from common.tasks import pct_of_ideal
    assert pct_of_ideal(0.448, "PerceptualDecisionMaking-v0", 100) == pytest.approx(50.0)
    assert pct_of_ideal(0.5, "DelayMatchCategory-v0", 100) is None      # the ceiling is chance
    assert pct_of_ideal(0.9, "GoNogo-v0", 100) is None                  # no ceiling known
