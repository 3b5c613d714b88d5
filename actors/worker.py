"""The actor role: a :class:`TrialCollector` that ships its trials to a replay.

Plain class, free of any runtime: it is handed a :class:`common.roles.ReplayClient` and a
weights ``fetch`` (``driver/runtime/ray_roles.py`` gives Ray ones; :mod:`common.roles` in-process
ones).  Everything it sends (trials to the replay, summaries to the driver) is msgpack; weights
arrive as a handle of msgpack bytes, fetched only when their version is newer.
"""
from __future__ import annotations

import os
import time
import uuid

import msgpack
import torch

from mpn_dqn.actors.collector import TrialCollector
from mpn_dqn.common.codec import decode_params, encode_trials
from mpn_dqn.common.config import TrainConfig
from mpn_dqn.common.networks import NetSpec
from mpn_dqn.common.exploration import actor_epsilon, epsilon_at, epsilon_per_step
from mpn_dqn.common.roles import ReplayClient, ReplayUnavailable, WeightsFetch, WeightsUnavailable, local_fetch



class ActorWorker:
    def __init__(self, cfg: dict, spec: dict, actor_id: int, num_actors: int, replay: ReplayClient,
                 params_msg: bytes, seed_offset: int = 0, fetch: WeightsFetch = local_fetch):
        torch.set_num_threads(1)
        self.cfg = TrainConfig.from_dict(cfg)
        self.spec = NetSpec(**spec)
        self.actor_id, self.num_actors = actor_id, num_actors
        self.rank = actor_id                     # position in the ε spread (see run_chunk)
        self.replay = replay
        self.fetch = fetch
        params, version = decode_params(params_msg)
        c = self.cfg
        self.collector = TrialCollector(
            c.env_name, c.dt, self.spec, params, num_envs=c.envs_per_actor,
            trials_per_episode=c.trials_per_episode, seed=c.seed + seed_offset, actor_id=actor_id,
            burn_in_steps=c.burn_in_steps if c.replay_init == "burn-in" else 0, weights_version=version)
        # trial messages not yet acknowledged by the replay server, oldest first, each
        # (seq, msgpack bytes): whole messages, retried until acknowledged; the server drops
        # a (source, seq) it already holds, so a retry never inserts a message twice
        self.pending: list[tuple[int, bytes]] = []
        self.source = f"actor{actor_id}-{uuid.uuid4().hex[:12]}"   # this incarnation
        self.seq = 0
        self.acked: dict[int, int] = {}          # replay epoch -> trials it acknowledged
        self.replay_down = False
        self.replay_errors = 0
        self.blocked_s = 0.0
        self.inserted = 0
        self.rejected = 0

    @property
    def weights_version(self) -> int:
        return self.collector.weights_version

    def drain(self, timeout_s: float = 5.0) -> int:
        """Ship the trial messages still pending (the driver is removing this actor);
        returns how many could not be shipped within ``timeout_s``."""
        self._flush(time.time() + timeout_s)
        return len(self.pending)

    def pid(self) -> int:
        return os.getpid()

    def set_replay(self, replay: ReplayClient) -> bool:
        """Use this replay server from now on (the driver restarted it); pending messages
        are retried there."""
        self.replay = replay
        self.replay_down = False
        return True

    def _enqueue(self, payload: bytes) -> None:
        self.pending.append((self.seq, payload))
        self.seq += 1

    def _flush(self, deadline: float) -> None:
        while self.pending:
            seq, payload = self.pending[0]
            try:
                res = self.replay.insert(payload, self.source, seq)
            except ReplayUnavailable:
                # the replay server is gone (or hung): keep the message, wait for the driver
                # to hand over a restarted server (set_replay), retry then
                self.replay_down = True
                self.replay_errors += 1
                time.sleep(max(0.0, min(0.25, deadline - time.time())))
                return
            self.replay_down = False
            if res["status"] == "retry":
                if time.time() > deadline:
                    return                      # keep it pending; the driver calls again
                t0 = time.time()
                time.sleep(0.005)
                self.blocked_s += time.time() - t0
                continue
            if res["status"] == "rejected":
                self.rejected += 1
            else:
                self.inserted += res["accepted"]
                epoch = int(res.get("epoch", 0))
                self.acked[epoch] = self.acked.get(epoch, 0) + res["accepted"]
            self.pending.pop(0)

    def run_chunk(self, global_env_steps: int, weights: list | None = None, seconds: float = 0.25,
                  spread: tuple[int, int] | None = None, steps: int | None = None) -> bytes:
        """Act for about ``seconds`` (or exactly ``steps`` vectorised env steps, then one
        attempt to ship); ship completed trials; return a msgpack summary.

        ``weights``: ``[version, handle]`` of the newest published weights, or None.  The handle
        is fetched only when its version is newer than the one acting.  ``spread``: (rank, count)
        of this actor among the job's active actors, for the ε spread (given by the driver on
        every call, so it follows ``scale``).
        """
        if weights is not None and int(weights[0]) > self.collector.weights_version:
            try:
                params, version = decode_params(self.fetch(weights[1]))
                self.collector.set_params(params, version)
            except WeightsUnavailable:
                pass        # the learner that published them died; the driver sends newer ones
        c = self.cfg
        base = epsilon_at(global_env_steps, c.epsilon_start, c.epsilon_end, c.epsilon_decay_steps, c.dt)
        if spread is not None:
            self.rank, self.num_actors = int(spread[0]), int(spread[1])
        self.collector.epsilon = epsilon_per_step(actor_epsilon(base, self.rank, self.num_actors), c.dt)
        t_end = time.time() + (seconds if steps is None else 0.0)
        cpu0 = time.process_time()
        summaries, episodes = [], []
        steps0, blocked0 = self.collector.env_steps, self.blocked_s
        self._flush(t_end)
        trials = []
        left = steps
        while not self.pending and (time.time() < t_end if steps is None else left > 0):
            for _ in range(16 if steps is None else min(16, left)):
                t, e = self.collector.step()
                trials.extend(t)
                episodes.extend(e)
            if steps is not None:
                left -= min(16, left)
            if len(trials) >= 2 * self.collector.K:       # ship in batches of trials
                self._enqueue(encode_trials(trials))
                summaries.extend(_trial_summaries(trials))
                trials = []
                self._flush(t_end)
        if trials:
            self._enqueue(encode_trials(trials))
            summaries.extend(_trial_summaries(trials))
            self._flush(t_end)
        out = {"actor_id": self.actor_id, "env_steps": self.collector.env_steps - steps0,
               "trials": summaries,
               "episodes": [[e.steps, e.reward, e.trials, e.correct] for e in episodes],
               "weights_version": self.collector.weights_version, "epsilon": self.collector.epsilon,
               "blocked_s": self.blocked_s - blocked0, "pending": len(self.pending),
               "rejected": self.rejected, "acked": [[e, n] for e, n in self.acked.items()],
               "replay_down": self.replay_down, "replay_errors": self.replay_errors,
               "cpu_s": time.process_time() - cpu0}
        return msgpack.packb(out, use_bin_type=True)


def _trial_summaries(trials) -> list:
    """[correct, length, fix_breaks>0, weights_version, reward, premature] per trial."""
    return [[int(t.correct), t.length, int(t.fix_breaks > 0), t.weights_version, t.total_reward,
             int(t.premature)] for t in trials]
