"""`analyze`: a record of greedy trials with h and M, and analyses that can fail.

A short real training of DelayMatchSample (single process), then `main.py analyze` on it: the
record's schema, a known variable (the sample, which a Hebbian M stores from the input) decodes
above chance from M through the delay, and the same decoder on shuffled labels does not.
"""
import json

import numpy as np
import pytest

from mpn_dqn.common.analysis import decode, load_record, participation_ratio
from mpn_dqn.driver.cli.parser import main

DMS = "DelayMatchSample-v0"
pytestmark = pytest.mark.slow                # a real training and a 120-trial analysis (~18 s)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    root = tmp_path_factory.mktemp("an")
    assert main(["train-neurogym", "--env-name", DMS, "--num-actors", "0", "--num-episodes", "16",
                 "--envs-per-actor", "4", "--learning-starts", "16", "--trial-batch-size", "8",
                 "--hidden-dim", "16", "--eval-trials", "20", "--experiments-dir", str(root),
                 "--experiment-name", "dms"]) == 0
    assert main(["analyze", "--experiments-dir", str(root), "--experiment-name", "dms",
                 "--num-trials", "120"]) == 0
    return root / "dms" / "analysis"


def test_the_record_holds_every_step_and_trial(analysed):
    rec = load_record(analysed / "trials.npz")
    n, steps = rec.num_trials, len(rec["action"])
    assert n >= 120 and rec["trial_offsets"][-1] == steps == rec["trial_length"].sum()
    for key, width in (("obs", rec.meta["obs_dim"]), ("q", rec.meta["num_actions"]),
                       ("h", rec.meta["hidden_dim"]), ("M", rec.meta["state_size"])):
        assert rec[key].shape == (steps, width), key
    assert rec.meta["env_name"] == DMS and rec.meta["core"] == "mpn"
    assert set(rec.meta["period_names"]) == {"fixation", "sample", "delay", "test", "decision"}
    assert {"cond_ground_truth", "cond_sample_theta", "cond_test_theta"} <= set(rec.arrays)
    # periods line up with the ground truth: an answer is due in the decision period only
    dec = rec.period_mask("decision")
    assert (rec["gt"][dec] != 0).all() and (rec["gt"][~dec] == 0).all()
    # M is reset at each episode's first trial and carried to the next trial otherwise
    first = rec["trial_offsets"][:-1][rec["trial_in_episode"] == 0]
    assert np.abs(rec["M"][first]).max() > 0                      # written by the first step
    assert set(np.unique(rec["trial_in_episode"])) <= set(range(10))


def test_a_known_variable_decodes_above_chance_and_its_shuffled_control_does_not(analysed):
    rec = load_record(analysed / "trials.npz")
    y = rec["cond_sample_theta"]
    delay_end = rec.at_step(rec["M"], int(np.flatnonzero(rec.period_mask("delay")[:rec["trial_length"][0]])[-1]))
    chance = np.unique(y, return_counts=True)[1].max() / len(y)
    assert decode(delay_end, y) > chance + 0.2
    assert decode(delay_end, y, shuffle=True) < chance + 0.12
    summary = json.loads((analysed / "summary.json").read_text())
    assert summary["decode_sample_theta_M_max"] > chance + 0.2
    assert summary["decode_sample_theta_shuffled_mean"] < chance + 0.1
    assert 1.0 <= summary["participation_ratio_M"] <= rec["M"].shape[1]


def test_figures_are_written_or_skipped_with_a_reason(analysed):
    summary = json.loads((analysed / "summary.json").read_text())
    assert set(summary["figures"]) == {"pca", "decoding", "cross_temporal"}
    assert "coherence" in summary["skipped"]["psychometric"]           # DMS has no signed evidence
    for name in summary["figures"].values():
        assert (analysed / name).stat().st_size > 5000


def test_participation_ratio_counts_dimensions():
    rng = np.random.default_rng(0)
    assert participation_ratio(rng.normal(size=(2000, 1)) @ np.ones((1, 8))) == pytest.approx(1.0, abs=1e-6)
    assert participation_ratio(rng.normal(size=(20000, 8))) == pytest.approx(8.0, rel=0.05)


def test_analyze_misuse_is_one_line_exit_2(tmp_path, capsys):
    assert main(["analyze", "--experiments-dir", str(tmp_path), "--experiment-name", "nope"]) == 2
    assert main(["analyze", "--experiments-dir", str(tmp_path), "--experiment-name", "x",
                 "--num-trials", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith(("analyze:", "mpn-dqn")) for e in err)
