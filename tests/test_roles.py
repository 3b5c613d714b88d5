"""The roles (actor, replay, learner) in one process, without Ray: acks, de-duplication, the
rate limiter, publishing and prefetch, through the interfaces of :mod:`common.roles`."""
from __future__ import annotations

import re
import time
from pathlib import Path

import msgpack
import pytest
import torch

from mpn_dqn.actors.worker import ActorWorker
from mpn_dqn.common.codec import encode_params
from mpn_dqn.common.config import TrainConfig
from mpn_dqn.common.networks import NetSpec, QNetwork, export_params
from mpn_dqn.common.roles import LocalReplay, ReplayUnavailable, WeightsUnavailable
from mpn_dqn.common.tasks import task_dims
from mpn_dqn.learner.worker import LearnerWorker
from mpn_dqn.replay.server import ReplayServer

ROOT = Path(__file__).resolve().parents[1]


def _setup(**over):
    torch.set_num_threads(1)
    cfg = TrainConfig(env_name="PerceptualDecisionMaking-v0", dt=100, hidden_dim=16, envs_per_actor=4,
                      trial_batch_size=8, learning_starts=8, buffer_size=200, seed=3, **over)
    obs_dim, num_actions = task_dims(cfg.env_name, cfg.dt)
    spec = NetSpec.from_config(cfg, obs_dim, num_actions)
    server = ReplayServer(**ReplayServer.config_kwargs(cfg, spec), seed=1)
    params_msg = encode_params(export_params(QNetwork(spec)), 0)
    return cfg, spec, server, params_msg


def _actor(cfg, spec, replay, params_msg, **kw):
    return ActorWorker(cfg.to_dict(), spec.to_dict(), 0, 1, replay, params_msg, **kw)


def test_actor_ships_trials_the_server_acknowledges():
    cfg, spec, server, msg = _setup(replay_ratio=0.01)    # the limiter never holds inserts here
    actor = _actor(cfg, spec, LocalReplay(server), msg)
    shipped = 0
    for _ in range(20):
        out = msgpack.unpackb(actor.run_chunk(0, steps=16), raw=False)
        shipped += len(out["trials"])
        assert out["env_steps"] == 16 * cfg.envs_per_actor
    assert actor.drain(1.0) == 0
    assert shipped > 0 and server.stats()["inserted"] == actor.inserted == shipped
    assert dict(out["acked"]) == {0: actor.inserted}


class LostAck(LocalReplay):
    """Stores the message, then loses the acknowledgement (a server that died after storing)."""

    def __init__(self, server, fail_every: int):
        super().__init__(server)
        self.calls, self.fail_every = 0, fail_every

    def insert(self, payload, source, seq):
        self.calls += 1
        res = super().insert(payload, source, seq)
        if self.calls % self.fail_every == 0:
            raise ReplayUnavailable("ack lost")
        return res


def test_a_retried_message_is_stored_once():
    cfg, spec, server, msg = _setup(replay_ratio=0.01)
    actor = _actor(cfg, spec, LostAck(server, fail_every=2), msg)
    shipped = 0
    for _ in range(30):
        shipped += len(msgpack.unpackb(actor.run_chunk(0, steps=16), raw=False)["trials"])
    actor.drain(1.0)
    assert not actor.pending and actor.replay_errors > 0
    st = server.stats()
    assert st["duplicates"] == actor.replay_errors       # each lost ack: one retry, answered duplicate
    assert st["inserted"] == shipped                     # every trial stored exactly once


def test_the_rate_limiter_holds_the_actor_until_the_learner_samples():
    cfg, spec, server, msg = _setup(replay_ratio=1.0)
    replay = LocalReplay(server)
    actor = _actor(cfg, spec, replay, msg)
    learner = LearnerWorker(cfg.to_dict(), spec.to_dict(), replay)
    for _ in range(60):
        actor.run_chunk(0, steps=16)
    st = server.stats()
    assert st["insert_blocked"] > 0 and actor.pending            # actors ran too far ahead
    held = st["inserted"]
    n = learner.train_available()
    assert n > 0 and server.sample_blocked > 0                     # trained until the limiter said wait
    st = server.stats()
    assert st["sampled"] <= 1.0 * st["inserted"] + server.limiter.error_buffer
    actor.run_chunk(0, steps=16)
    assert server.stats()["inserted"] > held                       # ... which let the actor on


def test_the_learner_publishes_versions_the_actor_takes():
    from mpn_dqn.common.codec import decode_params
    cfg, spec, server, msg = _setup(replay_ratio=4.0)
    replay = LocalReplay(server)
    actor = _actor(cfg, spec, replay, msg)
    learner = LearnerWorker(cfg.to_dict(), spec.to_dict(), replay, publish_period=2)
    v0 = learner.latest_weights()[0]
    while server.stats()["inserted"] < cfg.learning_starts:
        actor.run_chunk(0, steps=16)
    assert learner.train_available(max_updates=4) == 4
    version, handle = learner.latest_weights()
    assert version > v0 and isinstance(handle, bytes)
    params, v = decode_params(handle)
    fresh = export_params(learner.learner.online)          # published at update 4
    assert v == version and all(torch.equal(torch.as_tensor(params[k]), torch.as_tensor(fresh[k]))
                                for k in fresh)
    actor.run_chunk(0, weights=[version, handle], steps=1)
    assert actor.weights_version == version
    actor.run_chunk(0, weights=[version - 1, b"never fetched"], steps=1)   # older: not fetched
    assert actor.weights_version == version


def test_weights_that_cannot_be_fetched_leave_the_actor_on_its_version():
    cfg, spec, server, msg = _setup()

    def gone(handle):
        raise WeightsUnavailable("publisher died")
    actor = _actor(cfg, spec, LocalReplay(server), msg, fetch=gone)
    actor.run_chunk(0, weights=[5, b"x"], steps=1)
    assert actor.weights_version == 0


def test_prefetch_thread_trains_from_the_replay():
    cfg, spec, server, msg = _setup(replay_ratio=2.0)
    replay = LocalReplay(server)
    actor = _actor(cfg, spec, replay, msg)
    learner = LearnerWorker(cfg.to_dict(), spec.to_dict(), replay)
    learner.start()
    try:
        t_end = time.time() + 30
        while learner.learner.updates < 5 and time.time() < t_end:
            actor.run_chunk(0, seconds=0.05)
        st = msgpack.unpackb(learner.status(), raw=False)
        assert st["updates"] >= 5 and st["error"] is None and st["trial_steps"] > 0
    finally:
        learner.stop()


def test_with_two_replay_shards_the_learner_samples_each_under_its_own_rate_limit():
    cfg, spec, _, msg = _setup(replay_ratio=2.0, replay_shards=2, num_actors=2)
    servers = [ReplayServer(**ReplayServer.config_kwargs(cfg, spec), seed=k) for k in range(2)]
    assert all(s.buffer.capacity == 100 and s.limiter.min_size == 4 for s in servers)   # even shares
    actors = [ActorWorker(cfg.to_dict(), spec.to_dict(), k, 2, LocalReplay(servers[k]), msg) for k in range(2)]
    learner = LearnerWorker(cfg.to_dict(), spec.to_dict(), [LocalReplay(s) for s in servers])
    learner.start()
    try:
        assert len(learner.threads) == 3                 # a prefetch thread per shard + training
        t_end = time.time() + 30
        while learner.learner.updates < 10 and time.time() < t_end:
            for a in actors:
                a.run_chunk(0, seconds=0.03)
    finally:
        learner.stop()
    stats = [s.stats() for s in servers]
    assert learner.learner.updates >= 10 and learner.error is None
    for s, st in zip(servers, stats):
        assert st["inserted"] > 0 and st["sampled"] > 0                  # both shards fed and sampled
        assert st["sampled"] <= 2.0 * st["inserted"] + s.limiter.error_buffer
    merged = ReplayServer.merge_stats(stats)
    assert merged["inserted"] == sum(st["inserted"] for st in stats) and merged["shards"] == 2
    assert merged["sampled"] == sum(st["sampled"] for st in stats)


def test_the_prefetch_thread_survives_an_unreachable_replay():
    cfg, spec, server, msg = _setup()

    class Down:
        def sample(self, n):
            raise ReplayUnavailable("down")
    learner = LearnerWorker(cfg.to_dict(), spec.to_dict(), Down())
    learner.start()
    try:
        t_end = time.time() + 5
        while learner.replay_errors == 0 and time.time() < t_end:
            time.sleep(0.01)
        assert learner.replay_errors > 0 and learner.error is None
        learner.set_replay(LocalReplay(server))
    finally:
        learner.stop()


@pytest.mark.parametrize("folder", ["actors", "learner", "replay", "common"])
def test_roles_never_import_or_call_ray(folder):
    bad = re.compile(r"^\s*(import ray|from ray)|\bray\.", re.M)
    hits = [str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py") if bad.search(p.read_text())]
    assert hits == []


def test_the_single_process_runtime_runs_the_rate_limiter_acks_and_dedup(tmp_path, monkeypatch):
    """`train-neurogym --num-actors 0` runs the same roles in one process: the replay's rate
    limiter holds the learner to samples-per-insert, every shipped trial is acknowledged, and
    an insert whose acknowledgement is lost is retried and stored once."""
    import mpn_dqn.driver.runtime.local as local
    from mpn_dqn.driver.experiment import Experiment
    clients = []

    class Flaky(LostAck):
        def __init__(self, server):
            super().__init__(server, fail_every=3)
            self.unacked = 0                  # trials stored whose acknowledgement was lost
            clients.append(self)

        def insert(self, payload, source, seq):
            before = self.server.stats()["inserted"]
            try:
                return super().insert(payload, source, seq)
            except ReplayUnavailable:
                self.unacked += self.server.stats()["inserted"] - before
                raise
    monkeypatch.setattr(local, "LocalReplay", Flaky)
    cfg = TrainConfig(env_name="PerceptualDecisionMaking-v0", dt=100, hidden_dim=16, envs_per_actor=4,
                      trial_batch_size=8, learning_starts=16, buffer_size=400, replay_ratio=2.0,
                      num_episodes=12, trials_per_episode=5, eval_trials=0, num_actors=0,
                      time_limit_minutes=None, seed=1)
    exp = Experiment(tmp_path, "roles")
    exp.create(cfg)
    trainer = local.LocalTrainer(cfg, exp, log=lambda *a: None)
    summary = trainer.run()
    server, actor = trainer.replay, trainer.actor
    st = server.stats()
    # acks: every trial the driver counted is stored once; the actor holds an acknowledgement
    # for each, but those whose acknowledgement was lost
    assert not actor.pending and st["inserted"] == summary["trials"]
    assert clients[0].unacked > 0 and sum(actor.acked.values()) == st["inserted"] - clients[0].unacked
    # dedup: each lost acknowledgement was one retry, answered as a duplicate, stored once
    assert clients and clients[0].calls > st["inserted"] // 8 and actor.replay_errors > 0
    assert st["duplicates"] == actor.replay_errors
    # the rate limiter held the learner back and kept it within its slack
    assert server.sample_blocked > 0 and summary["updates"] > 0
    assert st["sampled"] <= cfg.replay_ratio * st["inserted"] + server.limiter.error_buffer
    assert st["sampled"] == summary["updates"] * cfg.trial_batch_size
    rec = exp.read_metrics()[-1]
    assert 0 < rec["replay_duplicates"] <= st["duplicates"] and rec["samples_per_insert"] is not None
