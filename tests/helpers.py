"""Test helpers: random but valid trials."""
from __future__ import annotations

import numpy as np

from mpn_dqn.common.trial import Trial


def make_trial(rng: np.random.Generator, length: int, obs_dim: int = 3, state_size: int = 8,
               num_actions: int = 3, burnin: int = 0) -> Trial:
    """A random valid trial of ``length`` steps with canonical dtypes; ``burnin > 0`` adds a
    burn-in of that many observations and a burn-in state, otherwise the Trial defaults."""
    trial_end = np.zeros(length, np.bool_)
    trial_end[-1] = True
    extra = {}
    if burnin:
        extra = dict(burnin_obs=rng.standard_normal((burnin, obs_dim)).astype(np.float32),
                     burnin_state=rng.standard_normal(state_size).astype(np.float32))
    return Trial(
        obs=rng.standard_normal((length, obs_dim)).astype(np.float32),
        actions=rng.integers(0, num_actions, length).astype(np.int64),
        rewards=rng.standard_normal(length).astype(np.float32),
        gt=rng.integers(0, num_actions, length).astype(np.int64),
        trial_end=trial_end,
        init_state=rng.standard_normal(state_size).astype(np.float32),
        ground_truth=int(rng.integers(0, num_actions)),
        correct=bool(rng.integers(0, 2)),
        fix_breaks=int(rng.integers(0, length + 1)),
        episode_id=int(rng.integers(0, 2 ** 40)),
        actor_id=int(rng.integers(0, 64)),
        env_id=int(rng.integers(0, 64)),
        trial_index=int(rng.integers(0, 1000)),
        weights_version=int(rng.integers(0, 2 ** 31)),
        **extra,
    )


def assert_trials_equal(a: Trial, b: Trial) -> None:
    """Field-by-field equality including dtypes (burn-in compared by content only when both
    are empty, since (0, 0) and (0, obs_dim) both mean "no burn-in")."""
    for name in ("obs", "actions", "rewards", "gt", "trial_end", "init_state"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, (name, x.dtype, y.dtype)
        np.testing.assert_array_equal(x, y, err_msg=name)
    if a.burnin_obs.size or b.burnin_obs.size:
        assert a.burnin_obs.dtype == b.burnin_obs.dtype
        np.testing.assert_array_equal(a.burnin_obs, b.burnin_obs)
        np.testing.assert_array_equal(a.burnin_state, b.burnin_state)
    for name in ("ground_truth", "correct", "fix_breaks", "episode_id", "actor_id", "env_id",
                 "trial_index", "weights_version"):
        assert getattr(a, name) == getattr(b, name), name
        assert type(getattr(a, name)) is type(getattr(b, name)), name


def msgpack_paths(obj, prefix=()):
    """Every path (tuple of keys / indices) into a decoded msgpack structure, root first."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from msgpack_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from msgpack_paths(v, prefix + (i,))


def assert_only_decode_errors(payload: bytes, schema) -> None:
    """Decoding ``payload`` either succeeds (a list of trials) or raises TrialDecodeError."""
    from mpn_dqn.common.codec import TrialDecodeError, decode_trials
    try:
        out = decode_trials(payload, schema)
    except TrialDecodeError:
        return
    assert isinstance(out, list)


def copy_experiment(trained, tmp_path):
    """A copy of a trained experiment directory under ``tmp_path / "exps"`` (tests change it)."""
    import shutil
    dst = tmp_path / "exps" / trained.name
    shutil.copytree(trained, dst)
    return dst


def sigkill_when(p, ready, timeout_s: float, log_path) -> None:
    """SIGKILL the process ``p`` once ``ready()`` holds (within ``timeout_s``); it must still be
    running then (else the assertion shows the end of ``log_path``)."""
    import signal
    import time
    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline and p.poll() is None and not ready():
            time.sleep(0.2)
        assert p.poll() is None, log_path.read_text()[-3000:]
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
