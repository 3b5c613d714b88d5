"""The trial stream of :class:`actors.collector.TrialCollector` against the real NeuroGym envs.

The reference for every check is an independent copy of each env (same seed, same actions,
stepped by hand here) or a re-run of the numpy policy, never the collector's own bookkeeping.
"""
import warnings
from collections import defaultdict

import numpy as np
import pytest
import torch

from mpn_dqn.actors.collector import TrialCollector, derive_seed
from mpn_dqn.common.networks import NetSpec, NumpyPolicy, QNetwork, export_params
from mpn_dqn.common.tasks import make_env, task_dims

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

PDM, CDM, DMS = "PerceptualDecisionMaking-v0", "ContextDecisionMaking-v0", "DelayMatchSample-v0"
TASKS = (PDM, CDM, DMS)


def _spec(env_name: str, dt: int = 100, core: str = "mpn", hidden_dim: int = 16) -> NetSpec:
    obs_dim, num_actions = task_dims(env_name, dt)
    return NetSpec(core=core, obs_dim=obs_dim, num_actions=num_actions, hidden_dim=hidden_dim,
                   eta=0.3, lambda_decay=0.9)


def _params(spec: NetSpec, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    net = QNetwork(spec)
    with torch.no_grad():                     # larger weights: Q varies with obs and M
        for p in net.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return export_params(net)


def _collector(env_name=PDM, dt=100, *, spec=None, params=None, num_envs=3, trials_per_episode=3,
               seed=11, actor_id=2, epsilon=0.3, burn_in_steps=0, core="mpn"):
    spec = spec or _spec(env_name, dt, core)
    params = params if params is not None else _params(spec)
    col = TrialCollector(env_name, dt, spec, params, num_envs=num_envs,
                         trials_per_episode=trials_per_episode, seed=seed, actor_id=actor_id,
                         burn_in_steps=burn_in_steps)
    col.epsilon = epsilon
    return col


def _spy_actions(col: TrialCollector) -> list[list[int]]:
    """Log every action the collector sends to each env (through the env's public step)."""
    logs: list[list[int]] = [[] for _ in col.envs]
    for k, env in enumerate(col.envs):
        real_step = env.step

        def spy(action, _k=k, _real=real_step):
            logs[_k].append(int(action))
            return _real(action)

        env.step = spy
    return logs


def _run(col: TrialCollector, steps: int):
    trials, episodes = [], []
    for _ in range(steps):
        t, e = col.step()
        trials.extend(t)
        episodes.extend(e)
    return trials, episodes


def _replay_env(env_name: str, dt: int, seed: int, actor_id: int, k: int, actions: list[int]) -> list[dict]:
    """Step a fresh copy of env k with the given actions; cut the stream into trials by hand.

    Returns every trial (the spoiled first one included) as a dict of per-step lists, plus the
    env's own label of the trial (``env.unwrapped.trial["ground_truth"]`` read during it).
    """
    s = derive_seed(seed, actor_id, k)
    env = make_env(env_name, dt, seed=s)
    u = env.unwrapped
    obs, _ = env.reset(seed=s)
    out, cur = [], defaultdict(list)
    for a in actions:
        cur["obs"].append(np.asarray(obs, np.float32))
        cur["gt"].append(int(u.gt_now))
        cur["label"].append(int(u.trial["ground_truth"]))
        cur["actions"].append(a)
        obs, r, term, trunc, info = env.step(a)
        assert not term and not trunc
        cur["rewards"].append(float(r))
        if info["new_trial"]:
            out.append(dict(cur))
            cur = defaultdict(list)
    env.close()
    return out


def _by_env(trials):
    per = defaultdict(list)
    for t in trials:
        per[t.env_id].append(t)
    return per


# --- trial boundaries, rewards, gt, ground truth ----------------------------------------------

@pytest.mark.parametrize("env_name,dt", [(PDM, 100), (CDM, 100), (DMS, 100), (PDM, 20)])
def test_trials_match_an_independent_copy_of_the_env(env_name, dt):
    seed, actor_id = 11, 2
    col = _collector(env_name, dt, seed=seed, actor_id=actor_id, epsilon=0.5)
    logs = _spy_actions(col)
    steps = 140 if dt == 100 else 400
    trials, _ = _run(col, steps)
    per = _by_env(trials)
    assert set(per) == set(range(col.K))
    for k in range(col.K):
        ref = _replay_env(env_name, dt, seed, actor_id, k, logs[k])
        assert len(ref) >= 3
        mine = per[k]
        # the spoiled first trial after reset() is dropped; every later finished trial is kept
        assert len(mine) == len(ref) - 1
        for t, r in zip(mine, ref[1:]):
            T = len(r["actions"])
            assert t.length == T
            np.testing.assert_array_equal(t.obs, np.stack(r["obs"]))
            np.testing.assert_array_equal(t.actions, r["actions"])
            np.testing.assert_array_equal(t.rewards, np.asarray(r["rewards"], np.float32))
            np.testing.assert_array_equal(t.gt, r["gt"])            # gt_now read before each step
            np.testing.assert_array_equal(t.trial_end, np.arange(T) == T - 1)
            assert len(set(r["label"])) == 1
            assert t.ground_truth == r["label"][0]                  # the finished trial's, not the next's
            assert t.correct == (r["rewards"][-1] >= 1.0)           # the ending step's reward is ours
            assert t.fix_breaks == sum(1 for x in r["rewards"] if abs(x + 0.1) < 1e-6)
            assert t.obs.dtype == np.float32 and t.actions.dtype == np.int64
            assert t.gt.dtype == np.int64 and t.rewards.dtype == np.float32
            assert t.trial_end.dtype == np.bool_ and t.actor_id == actor_id
        if env_name == PDM and dt == 100:     # measured fact: 22 steps whatever the actions
            assert {t.length for t in mine} == {22}
        if env_name == PDM and dt == 20:      # 110 steps; an answer ends the 5-step window early
            assert {t.length for t in mine} <= set(range(106, 111))
            assert max(t.length for t in mine) > 64                 # the step ring (64 rows) had to grow
            assert col._R >= 128
    # the stream exercised what the checks are about: right and wrong answers, fixation breaks
    assert any(t.correct for t in trials) and not all(t.correct for t in trials)
    assert sum(t.fix_breaks for t in trials) > 0
    col.close()


@pytest.mark.parametrize("env_name", TASKS)
def test_an_oracle_gets_every_trial_right(env_name):
    """Playing env.unwrapped.gt_now at every step: each trial ends with gt[-1], rewarded, correct."""
    col = _collector(env_name, num_envs=2, trials_per_episode=4, epsilon=0.0)
    col._act = lambda q: np.array([int(u.gt_now) for u in col.units])
    trials, episodes = _run(col, 150)
    assert len(trials) >= 8
    for t in trials:
        np.testing.assert_array_equal(t.actions, t.gt)
        assert t.actions[-1] == t.gt[-1] != 0
        assert t.correct and t.rewards[-1] == 1.0 and t.fix_breaks == 0
        assert t.total_reward == 1.0
        if env_name != PDM:      # PDM labels its answer 0/1 for actions 1/2
            assert t.ground_truth == t.gt[-1]
        else:
            assert t.ground_truth == t.gt[-1] - 1
    for e in episodes:
        assert e.correct == e.trials == 4 and e.reward == 4.0
    col.close()


# --- episodes ---------------------------------------------------------------------------------

def test_trial_index_and_episode_ids():
    tpe = 3
    col = _collector(CDM, num_envs=3, trials_per_episode=tpe)
    trials, episodes = _run(col, 400)
    per = _by_env(trials)
    all_ids = []
    for k, ts in per.items():
        ids = [t.episode_id for t in ts]
        assert ids == sorted(ids)                                 # increasing along the stream
        # trial_index runs 0..tpe-1 within each episode
        assert [t.trial_index for t in ts] == [i % tpe for i in range(len(ts))]
        for i in range(0, len(ts) - len(ts) % tpe, tpe):
            assert len({t.episode_id for t in ts[i:i + tpe]}) == 1
        all_ids.extend(ids[::tpe])
    assert len(all_ids) == len(set(all_ids))                      # distinct episodes, distinct ids
    # episode stats add up over their trials
    assert episodes
    for e in episodes:
        ts = [t for t in per[e.env_id] if t.episode_id == e.episode_id]
        assert len(ts) == e.trials == tpe
        assert e.steps == sum(t.length for t in ts)
        assert e.reward == pytest.approx(sum(t.total_reward for t in ts), abs=1e-5)
        assert e.correct == sum(t.correct for t in ts)
        assert e.fix_breaks == sum(t.fix_breaks for t in ts)
    col.close()


@pytest.mark.parametrize("core", ["mpn", "gru"])
def test_state_persists_across_trials_and_resets_between_episodes(core):
    env_name = PDM
    spec = _spec(env_name, core=core)
    params = _params(spec, seed=3)
    tpe = 4
    col = _collector(env_name, spec=spec, params=params, num_envs=2, trials_per_episode=tpe)
    trials, _ = _run(col, 260)
    policy = NumpyPolicy(spec, params)
    checked_later = 0
    for k, ts in _by_env(trials).items():
        eps = defaultdict(list)
        for t in ts:
            eps[t.episode_id].append(t)
        for ep in eps.values():
            assert [t.trial_index for t in ep] == list(range(len(ep)))
            np.testing.assert_array_equal(ep[0].init_state, 0.0)
            state = np.zeros((1, spec.state_size), np.float32)
            for i, t in enumerate(ep):
                assert t.init_state.dtype == np.float32 and t.init_state.shape == (spec.state_size,)
                if i > 0:
                    np.testing.assert_allclose(t.init_state, state[0], atol=1e-5, rtol=0)
                    assert np.abs(t.init_state).max() > 1e-3
                    checked_later += 1
                for o in t.obs:
                    policy.step(o[None], state)
    assert checked_later >= 4
    col.close()


# --- reproducibility --------------------------------------------------------------------------

def _fingerprint(trials):
    return [(t.env_id, t.episode_id, t.trial_index, t.obs.tobytes(), t.actions.tobytes(),
             t.rewards.tobytes(), t.init_state.tobytes()) for t in trials]


def test_same_seed_same_trials_different_seed_different_trials():
    spec = _spec(CDM)
    params = _params(spec)
    runs = []
    for seed, actor_id in ((5, 1), (5, 1), (6, 1), (5, 2)):
        col = _collector(CDM, spec=spec, params=params, seed=seed, actor_id=actor_id, epsilon=0.3)
        runs.append(_fingerprint(_run(col, 90)[0]))
        col.close()
    assert len(runs[0]) >= 6
    assert runs[0] == runs[1]
    assert runs[2] != runs[0]
    assert runs[3] != runs[0]
    # different seeds: different observations (the env's trials), not only different actions
    obs0 = {r[3] for r in runs[0]}
    assert not obs0 & {r[3] for r in runs[2]}


# --- exploration ------------------------------------------------------------------------------

def test_epsilon_zero_is_greedy():
    spec = _spec(DMS)
    params = _params(spec, seed=4)
    col = _collector(DMS, spec=spec, params=params, epsilon=0.0)
    trials, _ = _run(col, 120)
    policy = NumpyPolicy(spec, params)
    assert len(trials) >= 3
    for t in trials:
        state = t.init_state[None].copy()
        greedy = [int(policy.step(o[None], state)[0].argmax()) for o in t.obs]
        np.testing.assert_array_equal(t.actions, greedy)
    col.close()


def test_epsilon_one_spreads_over_all_actions():
    col = _collector(PDM, epsilon=1.0)
    trials, _ = _run(col, 150)
    actions = np.concatenate([t.actions for t in trials])
    counts = np.bincount(actions, minlength=3)
    assert len(counts) == 3
    assert counts.min() > 0.25 * len(actions), counts
    col.close()


# --- burn-in ----------------------------------------------------------------------------------

@pytest.mark.parametrize("env_name,n", [(PDM, 5), (CDM, 10)])
def test_burn_in_replays_into_the_init_state(env_name, n):
    spec = _spec(env_name)
    params = _params(spec, seed=2)
    col = _collector(env_name, spec=spec, params=params, num_envs=2, trials_per_episode=3,
                     burn_in_steps=n)
    trials, _ = _run(col, 200)
    policy = NumpyPolicy(spec, params)
    checked = 0
    for k, ts in _by_env(trials).items():
        for prev, t in zip([None] + ts[:-1], ts):
            if t.trial_index == 0:
                assert t.burnin_obs.shape[0] == 0
                continue
            assert prev.episode_id == t.episode_id and prev.trial_index == t.trial_index - 1
            assert t.burnin_obs.shape == (n, spec.obs_dim) and t.burnin_obs.dtype == np.float32
            assert t.burnin_state.shape == (spec.state_size,)
            np.testing.assert_array_equal(t.burnin_obs, prev.obs[-n:])
            state = t.burnin_state[None].copy()
            for o in t.burnin_obs:
                policy.step(o[None], state)
            np.testing.assert_allclose(state[0], t.init_state, atol=1e-6, rtol=0)
            checked += 1
    assert checked >= 4
    col.close()


def test_withhold_trials_count_as_correct_when_the_agent_fixates():
    """GoNogo's no-go trials reward a correct withhold with 0: an oracle must still score 1.0."""
    from mpn_dqn.actors.collector import TrialCollector
    from mpn_dqn.common.networks import NetSpec, QNetwork, export_params
    spec = NetSpec(core="mpn", obs_dim=3, num_actions=2, hidden_dim=8)
    col = TrialCollector("GoNogo-v0", 100, spec, export_params(QNetwork(spec)), num_envs=2,
                         trials_per_episode=5, seed=3)
    col._act = lambda q: np.array([int(u.gt_now) for u in col.units])      # oracle
    trials = []
    while len(trials) < 30:
        trials.extend(col.step()[0])
    assert {int(t.gt[-1]) for t in trials} == {0, 1}                        # both go and no-go
    assert all(t.correct for t in trials)


def test_exploration_is_defined_per_task_time():
    """ε is a probability per 100 ms of task time and decays over task time: at dt 10 a step
    explores with 1 - (1 - ε)^0.1, and the schedule takes 10x the steps; at dt 100 both are the
    plain per-step values."""
    from mpn_dqn.common.exploration import epsilon_at, epsilon_per_step
    assert epsilon_per_step(0.3, 100) == pytest.approx(0.3)
    p10 = epsilon_per_step(0.3, 10)
    assert 1 - (1 - p10) ** 10 == pytest.approx(0.3)            # 10 steps of 10 ms = 100 ms
    assert epsilon_at(50_000, 0.3, 0.01, 100_000, dt=100) == pytest.approx(0.155)
    assert epsilon_at(500_000, 0.3, 0.01, 100_000, dt=10) == pytest.approx(0.155)
    assert epsilon_at(10**7, 0.3, 0.01, 100_000, dt=10) == pytest.approx(0.01)


def test_records_come_every_percent_of_the_run_and_every_few_seconds():
    from types import SimpleNamespace
    from mpn_dqn.driver.observe.progress import Cadence
    cfg = SimpleNamespace(print_freq=250, record_seconds=2.0, checkpoint_freq=1000, checkpoint_minutes=1.0,
                          trials_per_episode=10)
    c = Cadence(cfg, 0, now=0.0, target=300)                   # 3000 trials: a record every 30
    kinds = []
    for ep in range(1, 301):
        k = c.record_due(ep, now=ep * 0.01, target=300, trials=10 * ep)
        if k:
            c.recorded(k, ep, ep * 0.01, trials=10 * ep)
            kinds.append(k)
    assert len(kinds) == 101 and kinds.count("line") == 2      # every 3rd episode, plus the line at 250
    c = Cadence(cfg, 0, now=0.0, target=10**6)
    assert c.record_due(5, now=1.0, target=10**6, trials=50) is None
    assert c.record_due(5, now=2.5, target=10**6, trials=50) == "record"      # by time
    c.recorded("record", 5, 2.5, trials=50)
    assert c.record_due(5, now=5.0, target=10**6, trials=50) is None           # nothing new to record
    assert not c.checkpoint_due(5, now=59.0) and c.checkpoint_due(5, now=61.0)


def test_a_time_bounded_run_records_by_time_and_never_runs_out_of_episodes():
    from types import SimpleNamespace
    from mpn_dqn.driver.observe.progress import Cadence, episodes_left, progress_line
    cfg = SimpleNamespace(print_freq=250, record_seconds=2.0, checkpoint_freq=1000, checkpoint_minutes=1.0,
                          trials_per_episode=10)
    c = Cadence(cfg, 0, now=0.0, target=None)
    assert episodes_left(10**9, None) and not episodes_left(300, 300)
    assert c.record_due(5, now=1.0, target=None, trials=50) is None            # no 1 % step
    assert c.record_due(5, now=2.5, target=None, trials=50) == "record"
    assert c.record_due(250, now=2.6, target=None, trials=2500) == "line"
    rec = {"episode": 250, "reward": 1.0, "episode_len": 10.0, "loss": 0.1, "epsilon": 0.1,
           "trials": 2500, "accuracy": 0.5, "pct_ceiling": 50.0, "best_trivial_accuracy": 0.5,
           "fix_break_rate": 0.0, "premature_rate": 0.0, "env_steps_per_s": 1.0,
           "updates_per_s": 1.0, "policy_lag": 0.0}
    assert progress_line(rec, None).startswith("Ep    250 | ")
    assert progress_line(rec, 1000).startswith("Ep  250/1000 | ")


def test_the_default_budget_is_ten_minutes_and_a_budget_must_end():
    import pytest
    from mpn_dqn.common.config import ConfigError, TrainConfig
    cfg = TrainConfig()
    assert cfg.num_episodes is None and cfg.time_limit_minutes == 10.0
    with pytest.raises(ConfigError, match="never end"):
        TrainConfig(time_limit_minutes=None)
    assert TrainConfig(time_limit_minutes=None, num_episodes=5).num_episodes == 5


def test_resume_continues_to_the_original_budget():
    import pytest
    from mpn_dqn.common.config import TrainConfig
    from mpn_dqn.driver.cli.preflight import UsageError
    from mpn_dqn.driver.cli.commands import resume_budget
    cfg = TrainConfig()                                        # 10 min, no episode target
    assert resume_budget(cfg, {"episodes": 50, "wall_time": 240.0}, None, None) == (None, 6.0)
    assert resume_budget(cfg, {"episodes": 50, "wall_time": 240.0}, 80, None) == (80, None)
    assert resume_budget(cfg, {"episodes": 50, "wall_time": 240.0}, None, 3.0) == (None, 3.0)
    with pytest.raises(UsageError, match="used its 10 min"):
        resume_budget(cfg, {"episodes": 50, "wall_time": 600.0}, None, None)
    with pytest.raises(UsageError, match="greater than that"):
        resume_budget(TrainConfig(num_episodes=40), {"episodes": 50}, None, None)
    capped = TrainConfig(num_episodes=100, time_limit_minutes=None)
    assert resume_budget(capped, {"episodes": 50, "wall_time": 9e9}, None, None) == (100, None)
