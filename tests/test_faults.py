"""Faults injected into the real Ray program: an actor, the replay server or the learner is
killed with SIGKILL mid-run; it is restarted and training goes on (driver/runtime/recovery.py).

Each test runs a DistributedTrainer on the shared Ray session with a fault hook (called once
per driver-loop turn) that kills a role, waits until the run has visibly recovered, then ends
the run early.  Bounded: every test has a wall-clock cap well under a minute.
"""
import os
import signal
import time

import numpy as np
import pytest

from mpn_dqn.common.config import TrainConfig
from mpn_dqn.driver.experiment import Experiment, load_checkpoint

pytestmark = pytest.mark.ray

CAP_S = 90          # a test whose run has not recovered by then fails


def _cfg(tmp_path, **kw):
    base = dict(env_name="PerceptualDecisionMaking-v0", num_actors=1, envs_per_actor=4,
                num_episodes=100_000, hidden_dim=16, trial_batch_size=8, learning_starts=16,
                buffer_size=300, print_freq=8, checkpoint_freq=8, eval_trials=0,
                replay_snapshot_every=0, experiments_dir=str(tmp_path), experiment_name="fault")
    base.update(kw)
    return TrainConfig(**base)


def _trainer(cfg, tmp_path):
    from mpn_dqn.driver.runtime.distributed import DistributedTrainer
    exp = Experiment(tmp_path, cfg.experiment_name)
    exp.create(cfg)
    lines = []
    tr = DistributedTrainer(cfg, exp, resume_from=None, target_episodes=cfg.num_episodes,
                            log=lines.append)
    return tr, exp, lines


def _sigkill(ray, handle) -> int:
    pid = ray.get(handle.pid.remote(), timeout=30)
    os.kill(pid, signal.SIGKILL)
    return pid


def _run(tr, hook):
    t0 = time.time()

    def guarded(t):
        if time.time() - t0 > CAP_S:
            t.target_episodes = t.counters.episodes        # end the run; the asserts fail
            return
        hook(t)
    tr.fault_hooks.append(guarded)
    return tr.run()


# every fault also with two replay servers (--replay-shards 2, one actor each)
SHARDS = pytest.mark.parametrize("shards", [1, 2])


def _sharded(tmp_path, shards, **kw):
    return _cfg(tmp_path, replay_shards=shards, num_actors=shards, **kw)


@SHARDS
def test_actor_killed_is_replaced_with_current_weights(ray_session, tmp_path, shards):
    ray = ray_session
    tr, exp, lines = _trainer(_sharded(tmp_path, shards), tmp_path)
    st = {}

    def hook(t):
        c = t.counters
        if "pid" not in st and t.status.get("updates", 0) > 0 and t.weights[0] > 2:
            st.update(pid=_sigkill(ray, t.actors[0]), ep=c.episodes, version=t.weights[0],
                      trials=c.trials, old=t.actors[0])
        elif "pid" in st and t.actor_restarts and t.actors[0] is not st["old"] \
                and c.episodes >= st["ep"] + 16 and t.actor_versions[0] > st["version"]:
            t.target_episodes = c.episodes                # recovered: end the run

    summary = _run(tr, hook)
    assert "pid" in st, "the fault was never injected"
    assert tr.actor_restarts == 1
    recs = exp.read_metrics()
    assert recs[-1]["actor_restarts"] == 1
    assert recs[-1]["episode"] >= st["ep"] + 16                      # training went on
    assert tr.actor_versions[0] > st["version"]           # the new actor acts on newer weights
    assert all(r["replay_rejected"] == 0 for r in recs)   # nothing half-inserted
    assert summary["trials"] > st["trials"]
    assert any("Actor 0 died" in line for line in lines)


@SHARDS
def test_replay_server_killed_comes_back_from_its_snapshot(ray_session, tmp_path, shards):
    ray = ray_session
    every = 40
    tr, exp, lines = _trainer(_sharded(tmp_path, shards, replay_snapshot_every=every), tmp_path)
    k = shards - 1                                        # the server killed: the last one
    st = {}
    max_chunk = [0]
    on_chunk = tr._on_chunk

    def counting(i, summary):
        max_chunk[0] = max(max_chunk[0], len(summary["trials"]))
        on_chunk(i, summary)
    tr._on_chunk = counting

    def hook(t):
        c = t.counters
        if "pid" not in st and t.replay_snapshots >= 2 and t.status.get("updates", 0) > 0:
            pre = ray.get(t.replays[k].stats.remote())
            st.update(pre=pre, pid=_sigkill(ray, t.replays[k]), ep=c.episodes,
                      updates=t.status["updates"])
        elif "pid" in st and t.replay_restarts and "after" not in st:
            st["after"] = t.status.get("updates", 0)
        elif "after" in st and t.status.get("updates", 0) >= st["after"] + 20 \
                and c.episodes >= st["ep"] + 16:
            st["stats"] = ray.get(t.replays[k].stats.remote())
            st["others"] = [ray.get(r.stats.remote()) for r in t.replays[:k]]
            t.target_episodes = c.episodes

    _run(tr, hook)
    assert "stats" in st, f"no recovery: {st}"
    assert tr.replay_restarts == 1
    restored = tr.restores[-1]
    # restored from the newest snapshot: at most what the dead server had, lost <= one period
    assert 0 < restored["inserted"] <= st["pre"]["inserted"]
    lost = tr.replay_trials_lost()
    # lost = what the dead server had beyond its snapshot: what it held when killed (give or
    # take the few messages that landed between the stats call and the kill) - restored
    gap = st["pre"]["inserted"] - restored["inserted"]
    assert gap <= lost <= gap + 64, (lost, gap)
    # and snapshots kept up: the driver counts trials as chunks return, so one falls due at
    # most a chunk per actor after `every` trials
    assert gap <= every + tr.cfg.num_actors * max_chunk[0] + 16, (gap, max_chunk)
    # the new server carries on from the snapshot's count, with no message stored twice
    assert st["stats"]["epoch"] == shards and st["stats"]["inserted"] > restored["inserted"]
    assert st["stats"]["rejected"] == 0
    # the learner's prefetch survived and samples from the new server
    assert st["stats"]["sampled"] > restored["samples"]
    # the other servers lived on: never restarted, sampled by the learner too
    assert all(o["epoch"] == i and o["sampled"] > 0 for i, o in enumerate(st["others"]))
    if shards > 1:
        assert all(tr.snap_paths[i].exists() for i in range(shards))      # one snapshot each
    recs = exp.read_metrics()
    assert recs[-1]["replay_restarts"] == 1 and recs[-1]["replay_trials_lost"] == lost
    print(f"\nreplay kill: lost {lost} trials (snapshot every {every}; "
          f"{st['pre']['inserted']} inserted before the kill, {restored['inserted']} restored)")


@SHARDS
def test_learner_killed_restarts_from_the_last_checkpoint(ray_session, tmp_path, shards):
    ray = ray_session
    tr, exp, lines = _trainer(_sharded(tmp_path, shards), tmp_path)
    st = {}

    def hook(t):
        c = t.counters
        if "pid" not in st and t.ck_bytes is not None and t.ck_counters["updates"] > 0:
            st.update(pid=_sigkill(ray, t.learner), ep=c.episodes,
                      ck_updates=t.ck_counters["updates"], versions=max(t.actor_versions))
        elif "pid" in st and t.learner_restarts and c.updates >= st["ck_updates"] + 20 \
                and min(t.actor_versions) > st["versions"]:
            t.target_episodes = c.episodes

    summary = _run(tr, hook)
    assert "pid" in st and tr.learner_restarts == 1
    assert summary["updates"] >= st["ck_updates"] + 20
    assert min(tr.actor_versions) > st["versions"]      # new versions reached every actor
    final = load_checkpoint(exp.checkpoint_dir / "final_model.pt")
    assert final["learner"]["updates"] >= st["ck_updates"] + 20
    recs = exp.read_metrics()
    assert recs[-1]["learner_restarts"] == 1
    assert np.all(np.diff([r["weights_version"] for r in recs]) >= 0)
